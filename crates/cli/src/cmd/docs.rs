//! `qmigrate completions SHELL` and the hidden `qmigrate man --out DIR`: shell completions
//! and man pages generated from the clap definitions, so they never drift from `--help`.

use std::path::PathBuf;

use anyhow::Context as _;

/// Arguments of `qmigrate completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Arguments of `qmigrate man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// The directory to write the pages into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: &CompletionsArgs, mut cli: clap::Command) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cli, "qmigrate", &mut out);
    Ok(())
}

/// Writes `qmigrate.1` and one `qmigrate-SUBCOMMAND.1` per visible subcommand into
/// `args.out`, and prints their paths.
pub fn man(args: &ManArgs, cli: clap::Command) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    clap_mangen::generate_to(cli, &args.out)
        .with_context(|| format!("cannot write the man pages into {}", args.out.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&args.out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    for page in pages {
        println!("{}", page.display());
    }
    Ok(())
}
