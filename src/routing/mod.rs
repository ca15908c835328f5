//! Which endpoint (tenant and branch) a connection is for, from its TLS SNI, its `options` startup parameter, the
//! suffix of its user name and the configured default — in that order, and every source that speaks must agree.
//!
//! Architecture invariant: pure functions over strings; no I/O, no tenant lookups beyond the `tenant_exists`
//! predicate used (only with a default tenant) to tell a routing suffix (`alice.acme`) from a user name that merely
//! contains a dot.

use crate::config::is_valid_label;

/// `<tenant>` or `<tenant>--<branch>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tenant: String,
    pub branch: Option<String>,
}

impl Endpoint {
    pub fn parse(s: &str) -> Option<Endpoint> {
        let s = s.to_ascii_lowercase();
        let (tenant, branch) = match s.split_once("--") {
            Some((t, b)) => (t.to_owned(), Some(b.to_owned())),
            None => (s.clone(), None),
        };
        if !is_valid_label(&tenant) || branch.as_deref().is_some_and(|b| !is_valid_label(b)) {
            return None;
        }
        Some(Endpoint { tenant, branch })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.branch {
            Some(b) => write!(f, "{}--{}", self.tenant, b),
            None => f.write_str(&self.tenant),
        }
    }
}

/// Where the endpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Sni,
    Options,
    UserSuffix,
    Default,
}

impl Source {
    fn describe(self) -> &'static str {
        match self {
            Source::Sni => "the TLS server name",
            Source::Options => "the options parameter",
            Source::UserSuffix => "the user name",
            Source::Default => "the default tenant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub endpoint: Endpoint,
    pub source: Source,
    /// The user name with a routing suffix removed.
    pub user: String,
    /// The `options` tokens other than pgweir's own (`endpoint=…`, `pool_mode=…`), unescaped.
    pub options: Vec<String>,
    /// `pool_mode=…` from `options`, if the client asked for one.
    pub pool_mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("conflicting endpoints: {} names \"{a}\" but {} names \"{b}\"", .a_src.describe(), .b_src.describe())]
    Conflict {
        a: Endpoint,
        a_src: Source,
        b: Endpoint,
        b_src: Source,
    },
    #[error("no endpoint given: connect to <endpoint>.<domain>, add options=endpoint=<endpoint> or log in as <user>.<endpoint>")]
    NoEndpoint,
    #[error("invalid endpoint \"{0}\": expected <tenant> or <tenant>--<branch> of [a-z0-9-]")]
    BadEndpoint(String),
}

/// The inputs of routing.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteInput<'a> {
    pub sni: Option<&'a str>,
    pub user: &'a str,
    pub options: Option<&'a str>,
    pub base_domain: Option<&'a str>,
    pub default_tenant: Option<&'a str>,
}

pub fn route(
    input: RouteInput<'_>,
    tenant_exists: impl Fn(&str) -> bool,
) -> Result<Routed, RouteError> {
    let mut found: Option<(Endpoint, Source)> = None;
    let mut offer = |ep: Endpoint, src: Source| -> Result<(), RouteError> {
        match &found {
            Some((a, a_src)) if *a != ep => Err(RouteError::Conflict {
                a: a.clone(),
                a_src: *a_src,
                b: ep,
                b_src: src,
            }),
            Some(_) => Ok(()),
            None => {
                found = Some((ep, src));
                Ok(())
            }
        }
    };

    if let (Some(sni), Some(domain)) = (input.sni, input.base_domain) {
        let sni = sni.to_ascii_lowercase();
        let domain = domain.to_ascii_lowercase();
        if let Some(label) = sni
            .strip_suffix(domain.as_str())
            .and_then(|l| l.strip_suffix('.'))
        {
            if !label.contains('.') {
                let ep = Endpoint::parse(label)
                    .ok_or_else(|| RouteError::BadEndpoint(label.to_owned()))?;
                offer(ep, Source::Sni)?;
            }
        }
    }

    let mut options = Vec::new();
    let mut pool_mode = None;
    for token in split_options(input.options.unwrap_or("")) {
        if let Some(v) = token.strip_prefix("endpoint=") {
            let ep = Endpoint::parse(v).ok_or_else(|| RouteError::BadEndpoint(v.to_owned()))?;
            offer(ep, Source::Options)?;
        } else if let Some(v) = token.strip_prefix("pool_mode=") {
            pool_mode = Some(v.to_owned());
        } else {
            options.push(token);
        }
    }

    // The user-name suffix. Without a default tenant (a multi-tenant deployment) any well-formed suffix routes, so
    // that neither routing nor a conflict reveals whether a tenant exists (a dotted user name then carries the
    // suffix: `john.doe.acme`). With a default tenant, only a suffix naming an existing tenant routes, so dotted
    // user names of single-tenant deployments keep working.
    let mut user = input.user.to_owned();
    if let Some((name, suffix)) = input.user.rsplit_once('.') {
        if let Some(ep) = Endpoint::parse(suffix) {
            if !name.is_empty() && (input.default_tenant.is_none() || tenant_exists(&ep.tenant)) {
                offer(ep, Source::UserSuffix)?;
                user = name.to_owned();
            }
        }
    }

    let (endpoint, source) = match found {
        Some(f) => f,
        None => match input.default_tenant {
            Some(t) => (
                Endpoint {
                    tenant: t.to_owned(),
                    branch: None,
                },
                Source::Default,
            ),
            None => return Err(RouteError::NoEndpoint),
        },
    };
    Ok(Routed {
        endpoint,
        source,
        user,
        options,
        pool_mode,
    })
}

/// Splits a Postgres `options` value into tokens: whitespace separates, a backslash escapes the next character.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                in_token = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                in_token = true;
                cur.push(c);
            }
        }
    }
    if in_token {
        out.push(cur);
    }
    out
}

/// The inverse of [`split_options`].
pub fn join_options(tokens: &[String]) -> String {
    let mut out = String::new();
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        for c in t.chars() {
            if c == '\\' || c.is_ascii_whitespace() {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// The `name=value` settings that `options` tokens carry (`-c name=value`, `-cname=value`, `--name=value`).
/// Other tokens are returned as `Err(token)`: the backend decides about them.
pub fn option_settings(tokens: &[String]) -> Vec<Result<(String, String), String>> {
    let mut out = Vec::new();
    let mut it = tokens.iter();
    while let Some(t) = it.next() {
        let setting = if t == "-c" {
            it.next().map(|s| s.as_str())
        } else if let Some(s) = t.strip_prefix("-c") {
            Some(s)
        } else {
            t.strip_prefix("--")
        };
        match setting.and_then(|s| s.split_once('=')) {
            Some((k, v)) => out.push(Ok((k.replace('-', "_"), v.to_owned()))),
            None => out.push(Err(t.clone())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).expect("test endpoint parses")
    }

    fn check(input: RouteInput<'_>, expected: Result<(&str, Source, &str), &str>) {
        let got = route(input, |t| ["acme", "beta"].contains(&t));
        match (got, expected) {
            (Ok(r), Ok((e, src, user))) => {
                assert_eq!((r.endpoint, r.source, r.user.as_str()), (ep(e), src, user))
            }
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{e}"),
            (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn routing_sources_and_conflicts() {
        let base = RouteInput {
            base_domain: Some("db.example.com"),
            ..Default::default()
        };
        check(
            RouteInput {
                sni: Some("acme.db.example.com"),
                user: "alice",
                ..base
            },
            Ok(("acme", Source::Sni, "alice")),
        );
        check(
            RouteInput {
                sni: Some("ACME--dev.DB.example.com"),
                user: "alice",
                ..base
            },
            Ok(("acme--dev", Source::Sni, "alice")),
        );
        check(
            RouteInput {
                options: Some("-c search_path=x endpoint=acme"),
                user: "alice",
                ..base
            },
            Ok(("acme", Source::Options, "alice")),
        );
        check(
            RouteInput {
                user: "alice.acme",
                ..base
            },
            Ok(("acme", Source::UserSuffix, "alice")),
        );
        check(
            RouteInput {
                user: "alice.acme--dev",
                ..base
            },
            Ok(("acme--dev", Source::UserSuffix, "alice")),
        );
        // A dotted user name whose suffix is no tenant stays whole.
        check(
            RouteInput {
                user: "john.doe",
                default_tenant: Some("beta"),
                ..base
            },
            Ok(("beta", Source::Default, "john.doe")),
        );
        check(
            RouteInput {
                sni: Some("acme.db.example.com"),
                user: "alice.acme",
                ..base
            },
            Ok(("acme", Source::Sni, "alice")),
        );
        check(
            RouteInput {
                sni: Some("acme.db.example.com"),
                options: Some("endpoint=beta"),
                user: "a",
                ..base
            },
            Err("conflicting endpoints"),
        );
        check(
            RouteInput {
                options: Some("endpoint=acme"),
                user: "alice.beta",
                ..base
            },
            Err("conflicting endpoints"),
        );
        // An SNI outside the base domain (an IP, another name) is not a routing source.
        check(
            RouteInput {
                sni: Some("localhost"),
                user: "alice.acme",
                ..base
            },
            Ok(("acme", Source::UserSuffix, "alice")),
        );
        check(
            RouteInput {
                user: "alice",
                ..base
            },
            Err("no endpoint given"),
        );
        check(
            RouteInput {
                options: Some("endpoint=Bad_Name"),
                user: "a",
                ..base
            },
            Err("invalid endpoint"),
        );
    }

    #[test]
    fn options_round_trip() {
        let toks = split_options(r"-c search_path=a\ b  endpoint=acme --statement-timeout=5s");
        assert_eq!(
            toks,
            vec![
                "-c",
                "search_path=a b",
                "endpoint=acme",
                "--statement-timeout=5s"
            ]
        );
        assert_eq!(split_options(&join_options(&toks)), toks);
        let settings = option_settings(&toks);
        assert_eq!(settings[0], Ok(("search_path".into(), "a b".into())));
        assert_eq!(settings[1], Err("endpoint=acme".into()));
        assert_eq!(settings[2], Ok(("statement_timeout".into(), "5s".into())));
    }
}
