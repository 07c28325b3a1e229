//! The subset of the IoT Hub query language minihub answers: `SELECT * FROM devices`, optionally
//! with `WHERE <path> = <literal> [AND …]` over the twin (`deviceId`, `status`, `tags.site`,
//! `properties.desired.mode`, …). Anything else is refused with a message saying what is supported.

use serde_json::Value;

use crate::error::MinihubError;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Query {
    /// Equality conditions, all of which must hold: a dotted path into the twin and a value.
    conditions: Vec<(Vec<String>, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Star,
    Equals,
    Literal(Value),
}

const SUPPORTED: &str =
    "minihub supports only SELECT * FROM devices [WHERE <property> = <value> [AND …]]";

fn unsupported(detail: &str) -> MinihubError {
    MinihubError::ArgumentInvalid(format!("unsupported query ({detail}); {SUPPORTED}"))
}

fn tokenize(text: &str) -> Result<Vec<Token>, MinihubError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '*' => {
                chars.next();
                tokens.push(Token::Star);
            }
            '=' => {
                chars.next();
                tokens.push(Token::Equals);
            }
            '\'' | '"' => {
                chars.next();
                let mut literal = String::new();
                loop {
                    match chars.next() {
                        Some(q) if q == c => {
                            // A doubled quote stands for one quote character.
                            if chars.peek() == Some(&c) {
                                chars.next();
                                literal.push(c);
                            } else {
                                break;
                            }
                        }
                        Some(other) => literal.push(other),
                        None => return Err(unsupported("unterminated string")),
                    }
                }
                tokens.push(Token::Literal(Value::String(literal)));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let mut number = String::new();
                while let Some(&d) = chars.peek() {
                    if d.is_ascii_digit() || matches!(d, '-' | '+' | '.' | 'e' | 'E') {
                        number.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                let value: Value = serde_json::from_str(&number)
                    .map_err(|_| unsupported(&format!("'{number}' is not a number")))?;
                tokens.push(Token::Literal(value));
            }
            c if c.is_alphanumeric() || c == '_' || c == '$' => {
                let mut word = String::new();
                while let Some(&d) = chars.peek() {
                    if d.is_alphanumeric() || matches!(d, '_' | '$' | '.' | '-') {
                        word.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Word(word));
            }
            other => return Err(unsupported(&format!("unexpected '{other}'"))),
        }
    }
    Ok(tokens)
}

fn keyword(token: Option<&Token>, word: &str) -> bool {
    matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(word))
}

impl Query {
    /// Parses a query string.
    pub fn parse(text: &str) -> Result<Self, MinihubError> {
        let tokens = tokenize(text)?;
        let mut it = tokens.iter();
        if !keyword(it.next(), "select") || it.next() != Some(&Token::Star) {
            return Err(unsupported("only 'SELECT *' is answered"));
        }
        if !keyword(it.next(), "from") {
            return Err(unsupported("expected FROM"));
        }
        if !keyword(it.next(), "devices") {
            return Err(unsupported("only the 'devices' collection is answered"));
        }
        let mut conditions = Vec::new();
        match it.next() {
            None => return Ok(Self { conditions }),
            Some(t) if keyword(Some(t), "where") => {}
            Some(_) => return Err(unsupported("expected WHERE or the end of the query")),
        }
        loop {
            let path = match it.next() {
                Some(Token::Word(w)) => w.split('.').map(str::to_owned).collect::<Vec<_>>(),
                _ => return Err(unsupported("expected a property name after WHERE/AND")),
            };
            if it.next() != Some(&Token::Equals) {
                return Err(unsupported("only '=' comparisons are answered"));
            }
            let value = match it.next() {
                Some(Token::Literal(v)) => v.clone(),
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
                _ => return Err(unsupported("expected a value after '='")),
            };
            conditions.push((path, value));
            match it.next() {
                None => return Ok(Self { conditions }),
                Some(t) if keyword(Some(t), "and") => {}
                Some(_) => return Err(unsupported("only AND joins conditions")),
            }
        }
    }

    /// Whether `twin` (as JSON) satisfies every condition.
    pub fn matches(&self, twin: &Value) -> bool {
        self.conditions.iter().all(|(path, wanted)| {
            let found = path
                .iter()
                .try_fold(twin, |node, key| node.get(key))
                .unwrap_or(&Value::Null);
            values_equal(found, wanted)
        })
    }
}

/// Numbers compare by value (`1` equals `1.0`), everything else structurally.
fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn select_all() {
        let q = Query::parse("SELECT * FROM devices").expect("parse");
        assert!(q.matches(&json!({"deviceId": "x"})));
        assert!(Query::parse("  select  *  from Devices ").is_ok());
    }

    #[test]
    fn where_clauses() {
        let q = Query::parse("SELECT * FROM devices WHERE deviceId = 'it''s-1'").expect("parse");
        assert!(q.matches(&json!({"deviceId": "it's-1"})));
        assert!(!q.matches(&json!({"deviceId": "other"})));
        let q = Query::parse(
            "SELECT * FROM devices WHERE tags.site = \"north\" AND properties.desired.level = 3 and status = 'enabled'",
        )
        .expect("parse");
        let twin = json!({"status": "enabled", "tags": {"site": "north"},
                          "properties": {"desired": {"level": 3.0}}});
        assert!(q.matches(&twin));
        assert!(!q.matches(&json!({"status": "enabled", "tags": {"site": "north"}})));
        let q =
            Query::parse("SELECT * FROM devices WHERE capabilities.iotEdge = true").expect("parse");
        assert!(q.matches(&json!({"capabilities": {"iotEdge": true}})));
    }

    #[test]
    fn unsupported_queries_say_what_is_supported() {
        for text in [
            "",
            "SELECT deviceId FROM devices",
            "SELECT * FROM devices.modules",
            "SELECT * FROM devices WHERE deviceId != 'a'",
            "SELECT * FROM devices WHERE deviceId = 'a' OR deviceId = 'b'",
            "SELECT * FROM devices WHERE deviceId = 'unterminated",
            "SELECT * FROM devices ORDER BY deviceId",
            "SELECT COUNT() FROM devices",
        ] {
            match Query::parse(text) {
                Err(MinihubError::ArgumentInvalid(message)) => {
                    assert!(
                        message.contains("SELECT * FROM devices"),
                        "{text}: {message}"
                    )
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
