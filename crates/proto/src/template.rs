//! connect-udp URI templates (RFC 9298 §2, RFC 6570): the subset a proxy template uses — literal
//! text, simple expressions `{target_host}` / `{target_port}`, and one form-style query
//! expression `{?target_host,target_port}`.
//!
//! The relay matches request paths against its configured template and publishes it in its PvD;
//! the client expands the template a PvD announced.
use crate::target::{self, Host, Target, TargetError};

/// A template's variables (RFC 9298 §2 defines exactly these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Host,
    Port,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `{target_host}` or `{target_port}`: RFC 6570 §3.2.2 simple string expansion.
    Simple(Var),
    /// `{?target_host,target_port}` (any order, RFC 6570 §3.2.8): must end the template.
    Query(Vec<Var>),
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unterminated or empty `{{...}}` expression")]
    Unterminated,
    #[error("unsupported expression `{{{0}}}` (only {{target_host}}, {{target_port}} and {{?target_host,target_port}})")]
    Unsupported(String),
    #[error("the template must contain both target_host and target_port, each once")]
    MissingVariable,
    #[error("two variables must be separated by literal text")]
    AdjacentVariables,
    #[error("the text after a variable must start with a reserved character such as `/` or `,`, so the value's end is unambiguous")]
    AmbiguousSeparator,
    #[error("a query expression `{{?...}}` must end the template, and the path must not already have a query")]
    QueryNotLast,
    #[error("the template must be an https URI or an absolute path starting with `/`")]
    NotHttps,
    #[error("the template contains characters not allowed in a URI")]
    BadCharacter,
}

/// A parsed connect-udp URI template. `origin` is `https://authority` for a full URI template and
/// empty for a path-only one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpTemplate {
    text: String,
    origin: String,
    parts: Vec<Part>,
}

impl UdpTemplate {
    /// The RFC 9298 §3 default, `/.well-known/masque/udp/{target_host}/{target_port}/`.
    pub fn well_known() -> UdpTemplate {
        UdpTemplate::parse(target::DEFAULT_UDP_TEMPLATE).expect("the default template is valid")
    }

    /// Parses a template: either an absolute path (`/masque/udp/{target_host}/{target_port}/`)
    /// or a full `https://host[:port]/...` URI template as a PvD carries it.
    pub fn parse(text: &str) -> Result<UdpTemplate, TemplateError> {
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST NOT contain any non-ASCII Unicode characters and MUST only
        //# contain ASCII characters in the range 0x21-0x7E inclusive
        if text.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(TemplateError::BadCharacter);
        }
        let (origin, path) = if let Some(rest) = text.strip_prefix("https://") {
            let slash = rest.find('/').ok_or(TemplateError::NotHttps)?;
            let authority = &rest[..slash];
            if authority.is_empty() || authority.contains(['{', '}', '@']) {
                return Err(TemplateError::NotHttps);
            }
            (format!("https://{authority}"), &rest[slash..])
        } else if text.starts_with('/') {
            (String::new(), text)
        } else {
            //= https://www.rfc-editor.org/rfc/rfc9298#section-2
            //# The URI Template MUST be in absolute form and MUST include non-empty scheme,
            //# authority, and path components.
            // (A relay's own configured template is a path: the relay adds its origin.)
            return Err(TemplateError::NotHttps);
        };
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST NOT use Reserved Expansion ("+" operator), Fragment Expansion
        //# ("#" operator), Label Expansion with Dot-Prefix, Path Segment Expansion with
        //# Slash-Prefix, nor Path-Style Parameter Expansion with Semicolon-Prefix.
        // `parse_parts` accepts only simple and form-style query expressions.
        let parts = parse_parts(path)?;
        let vars: Vec<Var> = parts
            .iter()
            .flat_map(|p| match p {
                Part::Simple(v) => vec![*v],
                Part::Query(vs) => vs.clone(),
                Part::Literal(_) => vec![],
            })
            .collect();
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST contain the two variables "target_host" and "target_port" and
        //# MAY contain other variables.
        // We support no other variable, so each of the two appears exactly once.
        if vars.len() != 2 || !vars.contains(&Var::Host) || !vars.contains(&Var::Port) {
            return Err(TemplateError::MissingVariable);
        }
        Ok(UdpTemplate {
            text: text.to_owned(),
            origin,
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `https://authority` of a full URI template; `None` for a path-only one.
    pub fn origin(&self) -> Option<&str> {
        (!self.origin.is_empty()).then_some(self.origin.as_str())
    }

    /// The same template with `https://{authority}` in front (what a PvD publishes).
    pub fn with_origin(&self, authority: &str) -> UdpTemplate {
        let path = &self.text[self.origin.len()..];
        UdpTemplate {
            text: format!("https://{authority}{path}"),
            origin: format!("https://{authority}"),
            parts: self.parts.clone(),
        }
    }

    /// Whether this is the RFC 9298 default path template.
    pub fn is_well_known(&self) -> bool {
        &self.text[self.origin.len()..] == target::DEFAULT_UDP_TEMPLATE
    }

    /// Client side: the `:path` (with query) for a tunnel to `target`.
    pub fn expand(&self, target: &Target) -> String {
        let host = encode_host(&target.host);
        let port = target.port.to_string();
        let value = |v: Var| match v {
            Var::Host => host.as_str(),
            Var::Port => port.as_str(),
        };
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Simple(v) => out.push_str(value(*v)),
                Part::Query(vs) => {
                    for (i, v) in vs.iter().enumerate() {
                        out.push(if i == 0 { '?' } else { '&' });
                        out.push_str(var_name(*v));
                        out.push('=');
                        out.push_str(value(*v));
                    }
                }
            }
        }
        out
    }

    /// Relay side: the target of a connect-udp request whose `:path` is `path_and_query`.
    ///
    /// The default template keeps the lenient matching of [`target::parse_connect_udp_path`];
    /// other templates match literally, a variable's value running up to the next literal.
    pub fn match_path(&self, path_and_query: &str) -> Result<Target, TargetError> {
        if self.is_well_known() {
            return target::parse_connect_udp_path(path_and_query);
        }
        // `/masque?h={target_host}&p={target_port}`: the query is part of the literal text.
        let literal_query = self
            .parts
            .iter()
            .any(|p| matches!(p, Part::Literal(l) if l.contains('?')));
        let (mut rest, query) = match path_and_query.split_once('?') {
            Some((p, q)) if !literal_query => (p, Some(q)),
            _ => (path_and_query, None),
        };
        let (mut host, mut port) = (None, None);
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Literal(l) => {
                    rest = rest
                        .strip_prefix(l.as_str())
                        .ok_or(TargetError::BadTemplate)?;
                }
                Part::Simple(v) => {
                    // RFC 6570 simple expansion percent-encodes every reserved character, so a
                    // value never contains the literal that follows it.
                    let end = match self.parts.get(i + 1) {
                        Some(Part::Literal(next)) => {
                            rest.find(next.as_str()).ok_or(TargetError::BadTemplate)?
                        }
                        _ => rest.len(),
                    };
                    let (value, after) = rest.split_at(end);
                    match v {
                        Var::Host => host = Some(value),
                        Var::Port => port = Some(value),
                    }
                    rest = after;
                }
                Part::Query(vars) => {
                    let query = query.ok_or(TargetError::BadTemplate)?;
                    for pair in query.split('&') {
                        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                        let slot = match name {
                            "target_host" if vars.contains(&Var::Host) => &mut host,
                            "target_port" if vars.contains(&Var::Port) => &mut port,
                            // Other parameters are not ours to interpret.
                            _ => continue,
                        };
                        if slot.replace(value).is_some() {
                            return Err(TargetError::BadTemplate);
                        }
                    }
                }
            }
        }
        // A query the template does not describe is ignored, as for the default template.
        if !rest.is_empty() {
            return Err(TargetError::BadTemplate);
        }
        let host = host.ok_or(TargetError::BadTemplate)?;
        let port = port.ok_or(TargetError::BadPort)?;
        target::decode_template_values(host, port)
    }
}

impl std::fmt::Display for UdpTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn var_name(v: Var) -> &'static str {
    match v {
        Var::Host => "target_host",
        Var::Port => "target_port",
    }
}

fn var_of(name: &str) -> Option<Var> {
    match name {
        "target_host" => Some(Var::Host),
        "target_port" => Some(Var::Port),
        _ => None,
    }
}

fn parse_parts(path: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if matches!(parts.last(), Some(Part::Query(_))) {
            return Err(TemplateError::QueryNotLast);
        }
        match rest.find(['{', '}']) {
            Some(0) if rest.starts_with('}') => return Err(TemplateError::Unterminated),
            Some(0) => {
                let close = rest.find('}').ok_or(TemplateError::Unterminated)?;
                let expr = &rest[1..close];
                rest = &rest[close + 1..];
                if expr.is_empty() {
                    return Err(TemplateError::Unterminated);
                }
                if let Some(list) = expr.strip_prefix('?') {
                    let vars = list
                        .split(',')
                        .map(|n| var_of(n).ok_or_else(|| TemplateError::Unsupported(expr.into())))
                        .collect::<Result<Vec<_>, _>>()?;
                    let literal_query = parts
                        .iter()
                        .any(|p| matches!(p, Part::Literal(l) if l.contains('?')));
                    if literal_query {
                        return Err(TemplateError::QueryNotLast);
                    }
                    parts.push(Part::Query(vars));
                } else {
                    let var =
                        var_of(expr).ok_or_else(|| TemplateError::Unsupported(expr.into()))?;
                    if matches!(parts.last(), Some(Part::Simple(_))) {
                        return Err(TemplateError::AdjacentVariables);
                    }
                    parts.push(Part::Simple(var));
                }
            }
            Some(n) => {
                check_separator(&parts, &rest[..n])?;
                parts.push(Part::Literal(rest[..n].to_owned()));
                rest = &rest[n..];
            }
            None => {
                check_separator(&parts, rest)?;
                parts.push(Part::Literal(rest.to_owned()));
                rest = "";
            }
        }
    }
    Ok(parts)
}

/// A simple expansion emits only unreserved characters and `%XX` (RFC 6570 §3.2.2), so a value
/// ends unambiguously only where a reserved character starts the literal after it.
fn check_separator(parts: &[Part], literal: &str) -> Result<(), TemplateError> {
    const RESERVED: &[u8] = b":/?#[]@!$&'()*+,;=";
    if matches!(parts.last(), Some(Part::Simple(_)))
        && !literal
            .bytes()
            .next()
            .is_some_and(|b| RESERVED.contains(&b))
    {
        return Err(TemplateError::AmbiguousSeparator);
    }
    Ok(())
}

/// RFC 6570 simple string expansion of a host: names and IPv4 literals are unreserved
/// characters only; an IPv6 literal's colons are percent-encoded.
fn encode_host(host: &Host) -> String {
    // RFC 9298 §3: "if the target_host is "2001:db8::42", it will be encoded in the URI as
    // "2001%3Adb8%3A%3A42"".
    match host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string().replace(':', "%3A"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target::new(host, port).unwrap()
    }

    #[test]
    fn well_known_template_expands_like_the_default_path() {
        let tpl = UdpTemplate::well_known();
        assert!(tpl.is_well_known());
        for target in [
            t("example.com", 443),
            t("2001:db8::1", 53),
            t("192.0.2.1", 1),
        ] {
            assert_eq!(tpl.expand(&target), target::connect_udp_path(&target));
            assert_eq!(tpl.match_path(&tpl.expand(&target)), Ok(target));
        }
    }

    #[test]
    fn path_and_query_templates_round_trip() {
        for text in [
            "/masque/udp/{target_host}/{target_port}/",
            "/masque/udp/{target_host},{target_port}",
            "/masque{?target_host,target_port}",
            "/masque{?target_port,target_host}",
            "/masque?h={target_host}&p={target_port}",
            "https://relay.example:4443/udp/{target_host}/{target_port}",
        ] {
            let tpl = UdpTemplate::parse(text).unwrap();
            for target in [
                t("example.com", 443),
                t("2001:db8::1", 53),
                t("192.0.2.1", 9),
            ] {
                let path = tpl.expand(&target);
                assert_eq!(tpl.match_path(&path), Ok(target.clone()), "{text} {path}");
            }
        }
        let tpl = UdpTemplate::parse("/masque{?target_host,target_port}").unwrap();
        assert_eq!(
            tpl.expand(&t("2001:db8::1", 53)),
            "/masque?target_host=2001%3Adb8%3A%3A1&target_port=53"
        );
        assert_eq!(
            tpl.match_path("/masque?target_port=53&x=1&target_host=example.com"),
            Ok(t("example.com", 53))
        );
    }

    #[test]
    fn full_uri_template_keeps_its_origin_and_path_only_gets_one() {
        let tpl =
            UdpTemplate::parse("https://r.example:8443/u/{target_host}/{target_port}/").unwrap();
        assert_eq!(tpl.origin(), Some("https://r.example:8443"));
        let path_only = UdpTemplate::parse("/u/{target_host}/{target_port}/").unwrap();
        assert_eq!(path_only.origin(), None);
        assert_eq!(path_only.with_origin("r.example:8443"), tpl);
        assert_eq!(
            UdpTemplate::well_known().with_origin("a:1").as_str(),
            "https://a:1/.well-known/masque/udp/{target_host}/{target_port}/"
        );
    }

    #[test]
    fn non_matching_paths_are_rejected() {
        let tpl = UdpTemplate::parse("/masque/udp/{target_host}/{target_port}/").unwrap();
        assert_eq!(
            tpl.match_path("/other/udp/a/1/"),
            Err(TargetError::BadTemplate)
        );
        assert_eq!(
            tpl.match_path("/masque/udp/a/1/x"),
            Err(TargetError::BadTemplate)
        );
        assert_eq!(
            tpl.match_path("/masque/udp/a/0/"),
            Err(TargetError::BadPort)
        );
        assert_eq!(
            tpl.match_path("/masque/udp/fe80%3A%3A1%25eth0/1/"),
            Err(TargetError::ZoneId)
        );
        let q = UdpTemplate::parse("/m{?target_host,target_port}").unwrap();
        assert_eq!(q.match_path("/m"), Err(TargetError::BadTemplate));
        assert_eq!(
            q.match_path("/m?target_host=a&target_host=b&target_port=1"),
            Err(TargetError::BadTemplate)
        );
    }

    #[test]
    fn invalid_templates_are_refused_with_the_reason() {
        use TemplateError::*;
        for (text, want) in [
            ("/u/{target_host}", MissingVariable),
            ("/u/{target_host}/{target_host}", MissingVariable),
            ("/u/{target_host}{target_port}", AdjacentVariables),
            (
                "/u/{+target_host}/{target_port}",
                Unsupported("+target_host".into()),
            ),
            (
                "/u/{target_host/{target_port}",
                Unsupported("target_host/{target_port".into()),
            ),
            ("/u/{target_host}/{target_port", Unterminated),
            ("/u/{}/{target_host}/{target_port}", Unterminated),
            ("/u{?target_host,target_port}/x", QueryNotLast),
            ("/u?a=1{?target_host,target_port}", QueryNotLast),
            ("http://a/{target_host}/{target_port}", NotHttps),
            ("u/{target_host}/{target_port}", NotHttps),
            ("/u/{target_host}/ {target_port}", BadCharacter),
            ("/u/{target_host}x/{target_port}", AmbiguousSeparator),
            ("/u/{target_host}%2F{target_port}", AmbiguousSeparator),
        ] {
            assert_eq!(UdpTemplate::parse(text), Err(want), "{text}");
        }
    }
}
