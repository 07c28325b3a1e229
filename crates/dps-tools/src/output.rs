//! Output of the admin commands: readable text by default, `--output json` for scripts.

use clap::ValueEnum;
use serde_json::Value;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    #[default]
    Human,
    /// JSON, exactly as the service API returns it.
    Json,
}

impl Output {
    /// Prints one object.
    pub fn print_item(self, item: &Value) {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(item).unwrap_or_default()),
            Output::Human => {
                let mut lines = Vec::new();
                flatten("", item, &mut lines);
                let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                for (key, value) in lines {
                    println!("{key:<width$}  {value}");
                }
            }
        }
    }

    /// Prints a list as a table with the given (header, dotted path) columns.
    pub fn print_list(self, items: &[Value], columns: &[(&str, &str)]) {
        if self == Output::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(items).unwrap_or_default()
            );
            return;
        }
        if items.is_empty() {
            println!("(none)");
            return;
        }
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|item| {
                columns
                    .iter()
                    .map(|(_, path)| scalar(lookup(item, path)))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!(
            "{}",
            line(columns.iter().map(|(h, _)| *h).collect()).trim_end()
        );
        for row in &rows {
            println!(
                "{}",
                line(row.iter().map(String::as_str).collect()).trim_end()
            );
        }
    }

    /// Reports a completed action.
    pub fn done(self, message: &str) {
        match self {
            Output::Json => println!("{}", serde_json::json!({"result": message})),
            Output::Human => println!("{message}"),
        }
    }
}

fn lookup<'v>(item: &'v Value, path: &str) -> &'v Value {
    path.split('.').fold(item, |v, key| &v[key])
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, child, out);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            out.push((
                prefix.to_owned(),
                items.iter().map(scalar).collect::<Vec<_>>().join(", "),
            ));
        }
        other => out.push((
            prefix.to_owned(),
            if other.is_object() {
                "{}".into()
            } else {
                scalar(other)
            },
        )),
    }
}
