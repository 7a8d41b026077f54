//! `exec:` commands as QEMU's typed exec transport runs them: an argv, no shell.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};

/// The argv for the typed exec transport, which runs it without a shell and without a `PATH`
/// search: a simple command is split into words (see [`qmigrate_qmp::split_command`]) and its
/// program looked up on our `PATH`; anything that needs a shell (redirections, pipes,
/// variables) runs as `/bin/sh -c COMMAND`, exactly as QEMU runs an `exec:` URI.
pub fn exec_args(command: &str) -> crate::Result<Vec<String>> {
    let shell = || vec!["/bin/sh".into(), "-c".into(), command.to_owned()];
    let Some(mut words) = qmigrate_qmp::split_command(command) else {
        return Ok(shell());
    };
    let Some(first) = words.first_mut() else {
        return Ok(shell());
    };
    let program = find_program(first).with_context(|| format!("exec:{command}"))?;
    *first = program.display().to_string();
    Ok(words)
}

/// An executable file: `name` itself when it has a `/` (made absolute), else the first match
/// on `PATH`.
fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let is_executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .context("cannot resolve a relative program path")?
                .join(path)
        };
        if !is_executable(&path) {
            bail!("{} is not an executable file", path.display());
        }
        return Ok(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| anyhow!("program {name:?} not found on PATH"))
}

/// `s` in single quotes for `/bin/sh` (a `'` inside becomes `'\''`).
pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_commands_become_argv_or_a_shell() {
        let args = exec_args("sh -c 'exit 0'").expect("sh is on PATH");
        assert!(
            args[0].starts_with('/') && args[0].ends_with("/sh"),
            "{args:?}"
        );
        assert_eq!(&args[1..], ["-c", "exit 0"]);
        assert_eq!(
            exec_args("gzip -c > '/x y'").expect("shell"),
            ["/bin/sh", "-c", "gzip -c > '/x y'"]
        );
        let err = exec_args("no-such-program-here -x").expect_err("missing");
        assert!(format!("{err:#}").contains("not found on PATH"), "{err:#}");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
