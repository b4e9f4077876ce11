//! Where a daemon's configuration file comes from, and the commented TOML of its defaults.
//!
//! Every daemon reads `/etc/meshblock/<daemon>.toml` when no `--config` is given (the packages
//! install it there); flags override what the file says. A file named with `--config` must
//! exist; the default file may be absent, which means the built-in defaults. Each daemon's
//! `config` module owns its keys, defaults and validation; this module owns only the lookup and
//! the rendering, so the three daemons behave and print alike.

use std::path::{Path, PathBuf};

/// Directory of the daemons' default configuration files.
pub const CONFIG_DIR: &str = "/etc/meshblock";

/// The file `daemon` (`mdm`, `sds`, `sdc`) reads when no `--config` is given.
pub fn default_path(daemon: &str) -> PathBuf {
    Path::new(CONFIG_DIR).join(format!("{daemon}.toml"))
}

/// A configuration file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file given with `--config` does not exist.
    #[error(
        "the configuration file {path} given with --config does not exist; create it (e.g. \
         from `{print_defaults}`) or leave --config out to read {default}"
    )]
    Missing {
        path: PathBuf,
        /// The command printing the daemon's documented defaults.
        print_defaults: String,
        default: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The configuration file to use and its text: the `explicit` one (which must exist), else
/// `default` when it exists, else `None` (built-in defaults; said at info level).
pub fn read(
    daemon: &str,
    explicit: Option<&Path>,
    default: &Path,
) -> Result<Option<(PathBuf, String)>, ConfigFileError> {
    let path = explicit.unwrap_or(default);
    match std::fs::read_to_string(path) {
        Ok(text) => {
            tracing::info!(file = %path.display(), "reading the configuration");
            Ok(Some((path.to_path_buf(), text)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match explicit {
            Some(p) => Err(ConfigFileError::Missing {
                path: p.to_path_buf(),
                print_defaults: print_defaults_command(daemon),
                default: default.to_path_buf(),
            }),
            None => {
                tracing::info!(
                    file = %default.display(),
                    "no configuration file; using the built-in defaults and the flags"
                );
                Ok(None)
            }
        },
        Err(source) => Err(ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The command that prints `daemon`'s documented defaults (the SDS takes flags only).
fn print_defaults_command(daemon: &str) -> String {
    match daemon {
        "sds" => "sds --print-default-config".to_string(),
        d => format!("{d} print-default-config"),
    }
}

/// Width of the comment lines in a rendered configuration.
const COMMENT_WIDTH: usize = 96;

/// The commented TOML of a configuration: `title` (one comment line), then every key of `docs`
/// in order, each after its documentation. `docs` names keys of sub-tables `table.key`, after
/// the sub-table's own entry `table`. A key absent from `values` (an unset option) is shown
/// commented out with its example from `unset_examples`.
pub fn render(
    title: &str,
    values: &toml::Table,
    docs: &[(&str, &str)],
    unset_examples: &[(&str, &str)],
) -> String {
    let mut out = format!("# {title}\n");
    for (key, doc) in docs {
        out.push('\n');
        let (table, leaf) = match key.split_once('.') {
            Some((t, leaf)) => (values.get(t).and_then(toml::Value::as_table), leaf),
            None => (Some(values), *key),
        };
        match table.and_then(|t| t.get(leaf)) {
            Some(toml::Value::Table(_)) => {
                push_comment(&mut out, doc);
                out.push_str(&format!("[{key}]\n"));
            }
            Some(v) => {
                push_comment(&mut out, doc);
                out.push_str(&format!("{leaf} = {v}\n"));
            }
            None => {
                push_comment(&mut out, doc);
                let example = unset_examples
                    .iter()
                    .find(|(k, _)| k == key)
                    .map_or("", |(_, e)| e);
                out.push_str(&format!("# {leaf} = {example}\n"));
            }
        }
    }
    out
}

fn push_comment(out: &mut String, doc: &str) {
    for line in wrap(doc, COMMENT_WIDTH) {
        out.push_str("# ");
        out.push_str(&line);
        out.push('\n');
    }
}

/// `text`'s words in lines of at most `width` characters (a longer word gets its own line).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(cur) if cur.len() + 1 + word.len() <= width => {
                cur.push(' ');
                cur.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// The keys of a parsed file that `docs` does not list (`table.key` for keys of sub-tables
/// `docs` lists), for the caller to warn about.
pub fn unknown_keys(raw: &toml::Table, docs: &[(&str, &str)]) -> Vec<String> {
    let known = |k: &str| docs.iter().any(|(d, _)| *d == k);
    let mut unknown = Vec::new();
    for (k, v) in raw {
        if !known(k) {
            unknown.push(k.clone());
            continue;
        }
        if let toml::Value::Table(t) = v {
            for sub in t.keys() {
                let full = format!("{k}.{sub}");
                if !known(&full) {
                    unknown.push(full);
                }
            }
        }
    }
    unknown
}

/// Check that `docs` documents exactly the keys of `values` (the defaults, serialized) plus the
/// unset options of `unset_examples`: for each daemon's config test.
pub fn check_documented(
    values: &toml::Table,
    docs: &[(&str, &str)],
    unset_examples: &[(&str, &str)],
) -> Result<(), String> {
    let mut keys: Vec<String> = Vec::new();
    for (k, v) in values {
        keys.push(k.clone());
        if let toml::Value::Table(t) = v {
            keys.extend(t.keys().map(|sub| format!("{k}.{sub}")));
        }
    }
    keys.extend(unset_examples.iter().map(|(k, _)| k.to_string()));
    let mut problems = Vec::new();
    for k in &keys {
        if !docs.iter().any(|(d, _)| d == k) {
            problems.push(format!("key {k} has no documentation"));
        }
    }
    for (d, _) in docs {
        if !keys.iter().any(|k| k == d) {
            problems.push(format!("documented key {d} does not exist"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn an_explicit_file_must_exist_and_the_default_may_not() {
        let d = Scratch(std::env::temp_dir().join(format!(
            "mb-config-file-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )));
        std::fs::create_dir_all(&d.0).expect("scratch");
        let default = d.0.join("sds.toml");
        let other = d.0.join("other.toml");
        // No file anywhere: built-in defaults, unless a file was named.
        assert!(read("sds", None, &default).expect("no default").is_none());
        let e = read("sds", Some(&other), &default).expect_err("named file missing");
        assert!(matches!(e, ConfigFileError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("--config"), "{e}");
        assert!(e.to_string().contains("sds --print-default-config"), "{e}");
        // The default file is read when it exists; a named file wins over it.
        std::fs::write(&default, "name = \"d\"\n").expect("write");
        std::fs::write(&other, "name = \"o\"\n").expect("write");
        let (p, t) = read("sds", None, &default).expect("read").expect("default");
        assert_eq!((p, t.as_str()), (default.clone(), "name = \"d\"\n"));
        let (p, t) = read("sds", Some(&other), &default)
            .expect("read")
            .expect("named");
        assert_eq!((p, t.as_str()), (other.clone(), "name = \"o\"\n"));
        // A directory is not a file: a read error, not the defaults.
        let e = read("sds", None, &d.0).expect_err("a directory");
        assert!(matches!(e, ConfigFileError::Read { .. }), "{e}");
        assert_eq!(default_path("mdm"), Path::new("/etc/meshblock/mdm.toml"));
    }

    #[test]
    fn rendering_documents_every_key_and_shows_unset_ones_commented_out() {
        let values: toml::Table =
            toml::from_str("a = 1\nb = \"x\"\n[t]\nc = true\n").expect("parse");
        let docs = [
            ("a", "The a."),
            ("opt", "An option."),
            ("b", "The b, with a long text that wraps."),
            ("t", "A table."),
            ("t.c", "The c."),
        ];
        let unset = [("opt", "\"10.0.0.1:1\"")];
        let text = render("Title.", &values, &docs, &unset);
        assert_eq!(
            text,
            "# Title.\n\n# The a.\na = 1\n\n# An option.\n# opt = \"10.0.0.1:1\"\n\n\
             # The b, with a long text that wraps.\nb = \"x\"\n\n# A table.\n[t]\n\n\
             # The c.\nc = true\n"
        );
        let back: toml::Table = toml::from_str(&text).expect("the rendering parses");
        assert_eq!(back, values);
        assert!(check_documented(&values, &docs, &unset).is_ok());
        assert!(check_documented(&values, &docs[..2], &unset).is_err());
        let raw: toml::Table =
            toml::from_str("a = 1\nz = 2\n[t]\nc = true\nq = 1\n").expect("parse");
        assert_eq!(unknown_keys(&raw, &docs), vec!["t.q", "z"]);
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
    }
}
