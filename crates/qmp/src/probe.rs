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
