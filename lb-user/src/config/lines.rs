//! Puts a line number on each semantic error: the validators say *what* is wrong in words that
//! name the offending key or value (`service "a"`, `backend 10.1.0.2:80`, `xdp.interfaces`);
//! this module finds that key in the document's spans (toml_edit) and prefixes `line N: `.
use std::net::SocketAddr;

use toml_edit::{ImDocument, Item, Value};

/// One key of the document: its dotted path without array indices, its line, its scalar value,
/// and the tables enclosing it (ids), innermost last.
#[derive(Debug)]
struct Entry {
    path: String,
    line: usize,
    value: Option<String>,
    scopes: Vec<usize>,
    /// A table header (or an inline table): a scope, never the target itself.
    table: bool,
}

/// Prefixes each error with `line N: ` where its key is found; leaves the others as they are.
pub(super) fn locate(text: &str, errors: Vec<String>) -> Vec<String> {
    let Ok(doc) = ImDocument::parse(text) else { return errors };
    let mut entries = Vec::new();
    let mut next_id = 0;
    walk_table(doc.as_table(), "", &mut vec![0], &mut next_id, text, &mut entries);
    errors
        .into_iter()
        .map(|e| match find(&entries, &e) {
            Some(line) => format!("line {line}: {e}"),
            None => e,
        })
        .collect()
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    span.map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

fn walk_table(
    table: &toml_edit::Table,
    prefix: &str,
    scopes: &mut Vec<usize>,
    next_id: &mut usize,
    text: &str,
    out: &mut Vec<Entry>,
) {
    for (key, item) in table.iter() {
        let path = join(prefix, key);
        let key_line = line_of(text, table.key(key).and_then(|k| k.span()));
        match item {
            Item::Table(t) => {
                let line = line_of(text, t.span()).max(key_line);
                out.push(Entry {
                    path: path.clone(),
                    line,
                    value: None,
                    scopes: scopes.clone(),
                    table: true,
                });
                *next_id += 1;
                scopes.push(*next_id);
                walk_table(t, &path, scopes, next_id, text, out);
                scopes.pop();
            }
            Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    let line = line_of(text, t.span());
                    out.push(Entry {
                        path: path.clone(),
                        line,
                        value: None,
                        scopes: scopes.clone(),
                        table: true,
                    });
                    *next_id += 1;
                    scopes.push(*next_id);
                    walk_table(t, &path, scopes, next_id, text, out);
                    scopes.pop();
                }
            }
            Item::Value(v) => walk_value(v, &path, key_line, scopes, next_id, text, out),
            Item::None => {}
        }
    }
}

fn walk_value(
    v: &Value,
    path: &str,
    key_line: usize,
    scopes: &mut Vec<usize>,
    next_id: &mut usize,
    text: &str,
    out: &mut Vec<Entry>,
) {
    let line = line_of(text, v.span()).max(key_line);
    let scalar = match v {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        Value::Boolean(b) => Some(b.value().to_string()),
        Value::Datetime(_) => None,
        Value::Array(a) => {
            out.push(Entry {
                path: path.into(),
                line,
                value: None,
                scopes: scopes.clone(),
                table: false,
            });
            for x in a.iter() {
                walk_value(x, path, 0, scopes, next_id, text, out);
            }
            return;
        }
        Value::InlineTable(t) => {
            out.push(Entry {
                path: path.into(),
                line,
                value: None,
                scopes: scopes.clone(),
                table: true,
            });
            *next_id += 1;
            scopes.push(*next_id);
            for (k, x) in t.iter() {
                let kl = line_of(text, t.key(k).and_then(|k| k.span()));
                walk_value(x, &join(path, k), kl, scopes, next_id, text, out);
            }
            scopes.pop();
            return;
        }
    };
    out.push(Entry {
        path: path.into(),
        line,
        value: scalar,
        scopes: scopes.clone(),
        table: false,
    });
}

/// What an error message mentions, in order.
#[derive(Debug, PartialEq)]
enum Anchor {
    Addr(String),
    Quoted(String),
    Path(String),
}

fn anchors(msg: &str) -> Vec<Anchor> {
    let mut out = Vec::new();
    // Quoted values, as the validators print names with {:?}.
    let mut rest = msg;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('"') else { break };
        out.push(Anchor::Quoted(after[..end].to_string()));
        rest = &after[end + 1..];
    }
    for word in msg.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')') {
        let w = word.trim_end_matches([':', '.', ';']);
        let w = w.trim_matches(|c| c == '`' || c == '"');
        if w.parse::<SocketAddr>().is_ok() {
            out.push(Anchor::Addr(w.to_string()));
        } else if let Some(inner) = w.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
            // `[upstream.NAME]` names a table that may not exist; the name is what to find.
            if let Some((_, name)) = inner.rsplit_once('.') {
                out.push(Anchor::Quoted(name.to_string()));
            }
        } else if w.contains('.')
            && ["admin.", "xdp.", "http.", "upstream.", "health.", "tcp.", "kubernetes."]
                .iter()
                .any(|p| w.starts_with(p))
        {
            out.push(Anchor::Path(w.to_string()));
        }
    }
    out
}

fn find(entries: &[Entry], msg: &str) -> Option<usize> {
    let anchors = anchors(msg);
    // Tables the message is about: a table prefix it names, or a table holding `name = "x"`.
    let mut scopes: Vec<usize> = Vec::new();
    let mut prefixes: Vec<&str> = Vec::new();
    for a in &anchors {
        match a {
            Anchor::Path(p) if entries.iter().any(|e| e.path == *p && e.table) => prefixes.push(p),
            Anchor::Quoted(q) => scopes.extend(
                entries
                    .iter()
                    .filter(|e| e.path.ends_with("name") && e.value.as_deref() == Some(q))
                    .filter_map(|e| e.scopes.last().copied()),
            ),
            _ => {}
        }
    }
    let in_scope = |e: &&Entry| {
        (scopes.is_empty() || scopes.iter().any(|s| e.scopes.contains(s)))
            && (prefixes.is_empty() || prefixes.iter().any(|p| e.path.starts_with(p)))
    };
    // The most specific thing it names: an address, then a key path, then a quoted value.
    fn value_is(v: &str) -> impl Fn(&&Entry) -> bool + '_ {
        move |e| e.value.as_deref() == Some(v)
    }
    let mut candidates: Vec<&Entry> = Vec::new();
    for kind in 0..3 {
        for a in &anchors {
            let found: Vec<&Entry> = match (kind, a) {
                (0, Anchor::Addr(x)) => entries.iter().filter(value_is(x)).collect(),
                (1, Anchor::Path(p)) => {
                    entries.iter().filter(|e| e.path == *p && !e.table).collect()
                }
                (2, Anchor::Quoted(q)) => entries.iter().filter(value_is(q)).collect(),
                _ => continue,
            };
            if !found.is_empty() {
                candidates = found;
                break;
            }
        }
        if !candidates.is_empty() {
            break;
        }
    }
    if candidates.is_empty() {
        // Only a table is named, or a key left at its default: point at the table's header.
        let table = |p: &str| {
            entries
                .iter()
                .filter(|e| e.table && e.line > 0 && p.starts_with(e.path.as_str()))
                .max_by_key(|e| e.path.len())
                .map(|e| e.line)
        };
        return anchors.iter().find_map(|a| match a {
            Anchor::Path(p) => table(p),
            _ => None,
        });
    }
    let scoped: Vec<&Entry> = candidates.iter().copied().filter(in_scope).collect();
    let pool = if scoped.is_empty() { candidates } else { scoped };
    let repeated = ["duplicate", "twice", "same"].iter().any(|w| msg.contains(w));
    let pick = if repeated { pool.last() } else { pool.first() };
    pick.map(|e| e.line).filter(|&l| l > 0)
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};

    /// The errors of `text`, which must be semantically invalid.
    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Err(ConfigError::Invalid { errors, .. }) => errors,
            other => panic!("expected semantic errors, got {other:?}"),
        }
    }

    fn line_of(errors: &[String], needle: &str) -> String {
        errors
            .iter()
            .find(|e| e.contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no error containing {needle:?} in {errors:#?}"))
    }

    #[test]
    fn each_xdp_error_names_its_line() {
        let e = errors(
            "[xdp]\ninterfaces = []\n[[xdp.service]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nbackends = [{ addr = \"10.1.0.2:80\", weight = 0 }]\n[[xdp.service]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nbackends = [\n  \"10.1.0.3:80\",\n  \"[::1]:80\",\n]\n",
        );
        assert!(line_of(&e, "xdp.interfaces is empty").starts_with("line 2: "), "{e:#?}");
        assert!(line_of(&e, "weight 0").starts_with("line 6: "), "{e:#?}");
        assert!(line_of(&e, "duplicate service name").starts_with("line 8: "), "{e:#?}");
        assert!(line_of(&e, "same VIP").starts_with("line 9: "), "{e:#?}");
        assert!(line_of(&e, "IPv6 backend").starts_with("line 12: "), "{e:#?}");
    }

    #[test]
    fn each_l7_error_names_its_line() {
        let e = errors(
            "[[http.listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n[[http.route]]\nlistener = \"b\"\nhost = \"*.*.x\"\npath = \"v1\"\nupstream = \"missing\"\n[upstream.u]\nbackends = [\"10.0.0.1:80\", \"10.0.0.1:80\"]\nconnect_timeout_ms = 0\n",
        );
        assert!(line_of(&e, "no http.listener named").starts_with("line 5: "), "{e:#?}");
        assert!(line_of(&e, "host \"*.*.x\"").starts_with("line 6: "), "{e:#?}");
        assert!(line_of(&e, "must start with /").starts_with("line 7: "), "{e:#?}");
        assert!(line_of(&e, "no [upstream.missing]").starts_with("line 8: "), "{e:#?}");
        assert!(line_of(&e, "listed twice").starts_with("line 10: "), "{e:#?}");
        // A key left at its default has no line of its own: the table's header.
        assert!(line_of(&e, "timeouts must be").starts_with("line 9: "), "{e:#?}");
    }

    #[test]
    fn backends_and_backends_from_together_name_their_line() {
        let from = "backends_from = { kubernetes = \"default/web\", port = \"http\" }";
        let e = errors(&format!(
            "[xdp]\ninterfaces = [\"eth0\"]\n[[xdp.service]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\n{from}\n[[xdp.service]]\nname = \"b\"\nvip = \"10.0.0.2:80\"\nbackends = [\"10.1.0.2:80\"]\n{from}\n[upstream.api]\nbackends = [\"10.0.0.1:80\"]\nbackends_from = {{ kubernetes = \"Default/web\", port = \"\" }}\n"
        ));
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(
            line_of(&e, "service \"b\": xdp.service.backends and backends_from")
                .starts_with("line 10: "),
            "{e:#?}"
        );
        assert!(line_of(&e, "upstream.api.backends and").starts_with("line 13: "), "{e:#?}");
        assert!(line_of(&e, "is not NAMESPACE/SERVICE").starts_with("line 14: "), "{e:#?}");
        assert!(line_of(&e, "port is empty").starts_with("line 14: "), "{e:#?}");
    }

    #[test]
    fn admin_and_health_errors_name_their_line() {
        let e = errors(
            "[admin]\nlisten = \"0.0.0.0:9901\"\n[upstream.api]\nbackends = [\"10.0.0.1:80\"]\n[health.api]\ntype = \"http\"\npath = \"healthz\"\ninterval = 1\ntimeout = 2\n[health.nope]\n",
        );
        assert!(line_of(&e, "not a loopback").starts_with("line 2: "), "{e:#?}");
        assert!(line_of(&e, "must start with /").starts_with("line 7: "), "{e:#?}");
        assert!(line_of(&e, "longer than").starts_with("line 9: "), "{e:#?}");
        assert!(line_of(&e, "health.nope").starts_with("line 10: "), "{e:#?}");
    }
}
