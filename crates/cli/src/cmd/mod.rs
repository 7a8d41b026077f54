//! One module per subcommand: its `Args` and its `run`.

mod common;
pub mod docs;
pub mod migrate;
pub mod receive;
pub mod recover;
pub mod send;
pub mod tunnel_client;
pub mod tunnel_server;

/// The ids of the flags given on the command line (not defaults, not a config file).
#[derive(Debug, Default, Clone)]
pub struct Given(std::collections::HashSet<String>);

impl Given {
    /// The flags given in `matches`.
    pub fn of(matches: &clap::ArgMatches) -> Given {
        Given(
            matches
                .ids()
                .filter(|id| {
                    matches.value_source(id.as_str())
                        == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_owned())
                .collect(),
        )
    }

    /// Whether the flag with this id (the field's name) was given.
    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}
