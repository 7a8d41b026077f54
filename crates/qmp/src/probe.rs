//! Asking a QEMU what it supports.

use serde_json::Value;

use crate::commands::QueryQmpSchema;
use crate::{Error, Qmp};

/// True when `migrate` / `migrate-incoming` take `channels` (QEMU >= 8.2), from the
/// introspection schema. If `query-qmp-schema` fails or its reply is not understood, falls back
/// to the greeting's version (>= 8.2.2). Errors only when the connection itself fails.
pub async fn supports_channels(qmp: &Qmp) -> Result<bool, Error> {
    match qmp.execute(&QueryQmpSchema).await {
        Ok(schema) => {
            if let Some(found) = schema_supports_channels(&schema) {
                return Ok(found);
            }
            tracing::debug!("query-qmp-schema has no migrate command; guessing from version");
        }
        Err(e @ (Error::Disconnected | Error::Protocol(_))) => return Err(e),
        Err(e) => tracing::debug!(error = %e, "query-qmp-schema failed; guessing from version"),
    }
    Ok(qmp.greeting().version.qemu.at_least(8, 2, 2))
}

/// Looks up command `migrate` in a `query-qmp-schema` reply and reports whether its argument
/// type (a numbered object type) has a member `channels`. `None` when the schema has no
/// `migrate` command or its argument type is missing.
pub fn schema_supports_channels(schema: &[Value]) -> Option<bool> {
    let meta = |e: &Value| {
        e.get("meta-type")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let name = |e: &Value| e.get("name").and_then(Value::as_str).map(str::to_string);
    let migrate = schema
        .iter()
        .find(|e| meta(e).as_deref() == Some("command") && name(e).as_deref() == Some("migrate"))?;
    let arg_type = migrate.get("arg-type")?.as_str()?;
    let args = schema
        .iter()
        .find(|e| name(e).as_deref() == Some(arg_type) && meta(e).as_deref() == Some("object"))?;
    let members = args.get("members")?.as_array()?;
    Some(
        members
            .iter()
            .any(|m| m.get("name").and_then(Value::as_str) == Some("channels")),
    )
}

/// What a QEMU's migration commands accept, from one `query-qmp-schema`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationSupport {
    /// `migrate` / `migrate-incoming` take `channels` (QEMU >= 8.2).
    pub channels: bool,
    /// `migrate-incoming` takes `exit-on-error` (QEMU >= 9.1): with `false` a failed incoming
    /// migration leaves QEMU running, so its `error-desc` can be read with `query-migrate`.
    pub incoming_exit_on_error: bool,
}

/// Asks QEMU what its migration commands accept, with one `query-qmp-schema`. Like
/// [`supports_channels`] it falls back to the greeting's version when the schema is not
/// understood, and errors only when the connection itself fails.
pub async fn migration_support(qmp: &Qmp) -> Result<MigrationSupport, Error> {
    let version = qmp.greeting().version.qemu;
    let by_version = MigrationSupport {
        channels: version.at_least(8, 2, 2),
        incoming_exit_on_error: version.at_least(9, 1, 0),
    };
    match qmp.execute(&QueryQmpSchema).await {
        Ok(schema) => Ok(MigrationSupport {
            channels: schema_command_has_argument(&schema, "migrate", "channels")
                .unwrap_or(by_version.channels),
            incoming_exit_on_error: schema_command_has_argument(
                &schema,
                "migrate-incoming",
                "exit-on-error",
            )
            .unwrap_or(by_version.incoming_exit_on_error),
        }),
        Err(e @ (Error::Disconnected | Error::Protocol(_))) => Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "query-qmp-schema failed; guessing from version");
            Ok(by_version)
        }
    }
}

/// Whether command `command` of a `query-qmp-schema` reply has an argument `argument`; `None`
/// when the schema has no such command or its argument type is missing.
pub fn schema_command_has_argument(
    schema: &[Value],
    command: &str,
    argument: &str,
) -> Option<bool> {
    let field = |e: &Value, key: &str| e.get(key).and_then(Value::as_str).map(str::to_owned);
    let cmd = schema.iter().find(|e| {
        field(e, "meta-type").as_deref() == Some("command")
            && field(e, "name").as_deref() == Some(command)
    })?;
    let arg_type = field(cmd, "arg-type")?;
    let args = schema.iter().find(|e| {
        field(e, "meta-type").as_deref() == Some("object")
            && field(e, "name").as_deref() == Some(arg_type.as_str())
    })?;
    Some(
        args.get("members")?
            .as_array()?
            .iter()
            .any(|m| m.get("name").and_then(Value::as_str) == Some(argument)),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn command_arguments_from_the_schema() {
        let schema = json!([
            {"name": "migrate-incoming", "meta-type": "command", "arg-type": "42", "ret-type": "0"},
            {"name": "42", "meta-type": "object", "members": [
                {"name": "uri", "type": "str"},
                {"name": "channels", "type": "[MigrationChannel]"},
                {"name": "exit-on-error", "type": "bool"}
            ]}
        ]);
        let schema = schema.as_array().expect("an array");
        assert_eq!(
            schema_command_has_argument(schema, "migrate-incoming", "exit-on-error"),
            Some(true)
        );
        assert_eq!(
            schema_command_has_argument(schema, "migrate-incoming", "resume"),
            Some(false)
        );
        assert_eq!(
            schema_command_has_argument(schema, "migrate", "channels"),
            None
        );
    }
}
