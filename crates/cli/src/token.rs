//! Where the tunnel's pre-shared token comes from: `--token-file PATH` or the environment
//! variable `QMIGRATE_TOKEN`, never the command line (every user sees it in `ps`).

use std::path::PathBuf;

use anyhow::Context as _;
use qmigrate_transport::Token;

use crate::exit::Exit;

/// The environment variable that holds the token when there is no `--token-file`.
pub const TOKEN_ENV: &str = "QMIGRATE_TOKEN";

/// The token flags, shared by every subcommand that opens or serves tunnel connections.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// File holding the pre-shared token that authenticates tunnel connections (both ends
    /// need the same one). It must be private (`chmod 600`). Without it, the token comes from
    /// the environment variable QMIGRATE_TOKEN, if set. Make one with
    /// `head -c 32 /dev/urandom | base64 > token; chmod 600 token`.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Refused: a token on the command line is visible to every user in `ps`.
    #[arg(long, value_name = "TOKEN", hide = true)]
    pub token: Option<String>,
}

impl TokenArgs {
    /// The token from `--token-file`, else from `QMIGRATE_TOKEN` (an empty value counts as
    /// unset), else `None`.
    pub fn load(&self) -> anyhow::Result<Option<Token>> {
        self.load_from(std::env::var_os(TOKEN_ENV))
    }

    fn load_from(&self, env: Option<std::ffi::OsString>) -> anyhow::Result<Option<Token>> {
        if self.token.is_some() {
            return Err(anyhow::anyhow!(
                "--token is not accepted: every user on this host could read the token in \
                 `ps`. Put it in a file (chmod 600) and pass --token-file PATH, or set \
                 {TOKEN_ENV}"
            ))
            .context(Exit::Usage);
        }
        if let Some(path) = &self.token_file {
            if env.as_ref().is_some_and(|v| !v.is_empty()) {
                tracing::debug!("--token-file given: {TOKEN_ENV} is not used");
            }
            return Token::from_file(path).map(Some).context(Exit::Usage);
        }
        match env {
            Some(value) if !value.is_empty() => Token::new(value.as_encoded_bytes(), TOKEN_ENV)
                .map(Some)
                .context(Exit::Usage),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const GOOD: &str = "c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0Cg==";

    fn args(token_file: Option<PathBuf>, token: Option<&str>) -> TokenArgs {
        TokenArgs {
            token_file,
            token: token.map(str::to_owned),
        }
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{GOOD}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let from_file = args(Some(path), None)
            .load_from(Some("another token, long enough".into()))
            .expect("load");
        assert_eq!(
            from_file,
            Some(Token::new(GOOD, "x").expect("token")),
            "the token file, not the environment"
        );
        let from_env = args(None, None).load_from(Some(GOOD.into())).expect("load");
        assert_eq!(from_env, Some(Token::new(GOOD, "x").expect("token")));
        assert_eq!(args(None, None).load_from(None).expect("load"), None);
        assert_eq!(
            args(None, None).load_from(Some("".into())).expect("load"),
            None,
            "an empty QMIGRATE_TOKEN is unset"
        );
    }

    #[test]
    fn a_readable_token_file_is_a_usage_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, GOOD).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = args(Some(path.clone()), None)
            .load_from(None)
            .expect_err("world-readable");
        assert_eq!(crate::exit::code_of(&err), 2);
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn a_token_on_the_command_line_is_refused() {
        let err = args(None, Some(GOOD)).load_from(None).expect_err("--token");
        assert_eq!(crate::exit::code_of(&err), 2);
        assert!(format!("{err:#}").contains("--token-file"), "{err:#}");
        let err = args(None, None)
            .load_from(Some("short".into()))
            .expect_err("too short");
        assert!(format!("{err:#}").contains(TOKEN_ENV), "{err:#}");
    }
}
