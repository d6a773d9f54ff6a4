//! Routes of one listener: Host (exact or `*.` wildcard) and path prefix → upstream group.
use crate::config::RouteConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// Lowercase name.
    Exact(String),
    /// Lowercase parent after `*.`; matches exactly one more label.
    Wildcard(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(h) => h.eq_ignore_ascii_case(host),
            Self::Wildcard(parent) => host.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty() && rest.eq_ignore_ascii_case(parent)
            }),
        }
    }

    /// Higher is more specific.
    fn rank(&self) -> u8 {
        match self {
            Self::Exact(_) => 2,
            Self::Wildcard(_) => 1,
            Self::Any => 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Route {
    host: HostMatch,
    path: String,
    upstream: String,
}

/// The routes of one listener, most specific first.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a RouteConfig>) -> Self {
        let mut routes: Vec<Route> = routes
            .into_iter()
            .map(|r| Route {
                host: match r.host.as_deref().map(str::to_ascii_lowercase) {
                    None => HostMatch::Any,
                    Some(h) => match h.strip_prefix("*.") {
                        Some(parent) => HostMatch::Wildcard(parent.to_string()),
                        None => HostMatch::Exact(h),
                    },
                },
                path: r.path.clone().unwrap_or_else(|| "/".into()),
                upstream: r.upstream.clone(),
            })
            .collect();
        // Stable: among equally specific routes the first written wins.
        routes.sort_by(|a, b| {
            b.host.rank().cmp(&a.host.rank()).then(b.path.len().cmp(&a.path.len()))
        });
        Self { routes }
    }

    /// The upstream group for a request. `host` may carry a port; `path` is the URI path.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&str> {
        let host = host.map(bare_host).unwrap_or_default();
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && path_has_prefix(path, &r.path))
            .map(|r| r.upstream.as_str())
    }
}

/// Without port and trailing dot (`[v6]:port` keeps its brackets); compared without regard
/// to case, so nothing is copied per request.
pub fn bare_host(host: &str) -> &str {
    let host = if host.starts_with('[') {
        host.split_once(']').map(|(h, _)| &host[..=h.len()]).unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    host.trim_end_matches('.')
}

/// `/v1` matches `/v1`, `/v1/x` and `/v1?q`, not `/v10`; a prefix ending in `/` matches as is.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, path: Option<&str>, upstream: &str) -> RouteConfig {
        RouteConfig {
            listener: "l".into(),
            host: host.map(Into::into),
            path: path.map(Into::into),
            upstream: upstream.into(),
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let r = Router::new(&[
            route(None, None, "default"),
            route(Some("*.example.com"), None, "wild"),
            route(Some("api.example.com"), None, "api"),
            route(Some("api.example.com"), Some("/v1"), "api-v1"),
            route(None, Some("/static/"), "static"),
        ]);
        assert_eq!(r.route(Some("api.example.com"), "/v1/users"), Some("api-v1"));
        assert_eq!(r.route(Some("API.example.com:8443"), "/v1"), Some("api-v1"));
        assert_eq!(r.route(Some("api.example.com"), "/v10"), Some("api"));
        assert_eq!(r.route(Some("www.example.com"), "/"), Some("wild"));
        assert_eq!(r.route(Some("a.b.example.com"), "/"), Some("default"), "one label only");
        assert_eq!(r.route(Some("example.com"), "/"), Some("default"));
        assert_eq!(r.route(Some("other"), "/static/x.css"), Some("static"));
        assert_eq!(r.route(None, "/"), Some("default"));
    }

    #[test]
    fn no_match_without_default() {
        let r = Router::new(&[route(Some("a.test"), Some("/x"), "a")]);
        assert_eq!(r.route(Some("a.test"), "/y"), None);
        assert_eq!(r.route(Some("b.test"), "/x"), None);
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(bare_host("Example.COM:80"), "Example.COM");
        assert_eq!(bare_host("example.com."), "example.com");
        assert_eq!(bare_host("[::1]:8080"), "[::1]");
    }
}
