//! What storage can hold, checked before a message or a completion is batched.
//!
//! PostgreSQL refuses a NUL character in `text` columns and in `jsonb` (a `\u0000` escape is
//! valid JSON, but `jsonb` answers SQLSTATE 22P05). One such row in a multi-row statement
//! would fail every row batched with it, so both backends refuse it up front, naming the
//! field: the JSON pointer of the string (or object key) that holds the NUL, or the column.
//! Whatever a backend still refuses for a reason not known here is isolated by the backend
//! itself (the Postgres batchers split a failing batch).

use super::{Completion, MessageStorageError, NewMessage, Reply};

/// The error code of the reply a message is completed with when its own reply or state
/// cannot be stored.
pub const UNSTORABLE_REPLY: &str = "unstorable_reply";

/// The JSON pointer (RFC 6901) of the first string or object key in `value` that holds a
/// NUL character, or `None` when storage can hold the whole value.
pub fn nul_pointer(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => Some(String::new()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_pointer(item).map(|rest| format!("/{i}{rest}"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            let escaped = key.replace('~', "~0").replace('/', "~1");
            if key.contains('\0') {
                // The key itself; NUL is shown escaped so the pointer stays printable.
                return Some(format!("/{}", escaped.replace('\0', "\\u0000")));
            }
            nul_pointer(item).map(|rest| format!("/{escaped}{rest}"))
        }),
        _ => None,
    }
}

fn unstorable(field: impl Into<String>, problem: impl Into<String>) -> MessageStorageError {
    MessageStorageError::Unstorable {
        field: field.into(),
        problem: problem.into(),
    }
}

fn check_json(field: &str, value: &serde_json::Value) -> Result<(), MessageStorageError> {
    match nul_pointer(value) {
        Some(pointer) if pointer.is_empty() => Err(unstorable(
            field,
            "the string holds a NUL character (\\u0000), which storage cannot hold",
        )),
        Some(pointer) => Err(unstorable(
            format!("{field}{pointer}"),
            "the string holds a NUL character (\\u0000), which storage cannot hold",
        )),
        None => Ok(()),
    }
}

fn check_text(field: &str, value: &str) -> Result<(), MessageStorageError> {
    if value.contains('\0') {
        return Err(unstorable(
            field,
            "holds a NUL character (\\u0000), which storage cannot hold",
        ));
    }
    Ok(())
}

/// Refuses an entity state storage cannot hold, naming the pointer under `state`.
pub fn check_state(state: &serde_json::Value) -> Result<(), MessageStorageError> {
    check_json("state", state)
}

/// Refuses a message storage cannot hold, naming the field (`payload/items/3`,
/// `idempotency_key`, `tag`). Entity types and ids are validated by their constructors.
pub fn check_message(message: &NewMessage) -> Result<(), MessageStorageError> {
    check_text("tag", &message.tag)?;
    if let Some(key) = &message.idempotency_key {
        check_text("idempotency_key", key)?;
    }
    check_json("payload", &message.payload)
}

/// Why a completion's reply or state cannot be stored, if it cannot.
pub fn completion_problem(completion: &Completion) -> Option<MessageStorageError> {
    let reply = match &completion.reply {
        Reply::Ok { value } => check_json("reply", value),
        Reply::Err { code, message } => {
            check_text("reply/code", code).and_then(|()| check_text("reply/message", message))
        }
    };
    let state = match &completion.state {
        Some((_, state)) => check_json("state", state),
        None => Ok(()),
    };
    let outbox = completion.outbox.iter().try_for_each(check_message);
    reply.and(state).and(outbox).err()
}

/// The completion written instead of one whose reply, state or outbox cannot be stored: the
/// same message, completed with an error reply naming the problem, no state change and no
/// outbox (they commit together or not at all).
pub fn unstorable_completion(completion: &Completion, problem: &MessageStorageError) -> Completion {
    Completion {
        message_id: completion.message_id,
        shard: completion.shard,
        epoch: completion.epoch,
        reply: Reply::Err {
            code: UNSTORABLE_REPLY.to_owned(),
            // The problem's text is built from field names and SQLSTATE messages; strip
            // NUL anyway so the substitute can always be stored.
            message: format!("the handler's result could not be stored: {problem}")
                .replace('\0', "\\u0000"),
        },
        state: None,
        outbox: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn pointer_names_the_string_holding_nul() {
        assert_eq!(
            nul_pointer(&json!({"a": [1, "x\u{0}"]})),
            Some("/a/1".into())
        );
        assert_eq!(
            nul_pointer(&json!({"a/b": {"~": "\u{0}"}})),
            Some("/a~1b/~0".into())
        );
        assert_eq!(nul_pointer(&json!("\u{0}")), Some(String::new()));
        assert_eq!(nul_pointer(&json!({"k\u{0}": 1})), Some("/k\\u0000".into()));
        assert_eq!(nul_pointer(&json!({"a": ["fine", 1.5, null]})), None);
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,6}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The pointer, when there is one, resolves to a string holding NUL (or names a key
        /// holding one); when there is none, no string or key anywhere holds NUL.
        #[test]
        fn pointer_is_exact(value in json_value()) {
            let text = value.to_string();
            match nul_pointer(&value) {
                None => prop_assert!(!text.contains("\\u0000")),
                Some(pointer) if pointer.contains("\\u0000") => {}
                Some(pointer) => {
                    let found = value.pointer(&pointer).and_then(|v| v.as_str());
                    prop_assert!(found.is_some_and(|s| s.contains('\0')), "{pointer}");
                }
            }
        }
    }
}
