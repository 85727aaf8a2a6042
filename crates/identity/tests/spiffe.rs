use nsm_identity::{Role, SpiffeId};

#[test]
fn valid_ids() {
    for (s, td, path) in [
        ("spiffe://example.org/node/n1", "example.org", "/node/n1"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://a-b_c.9/x", "a-b_c.9", "/x"),
        ("spiffe://td/A.b-C_d/e.f/..g/.h", "td", "/A.b-C_d/e.f/..g/.h"),
        ("spiffe://td/ns/default/client/web", "td", "/ns/default/client/web"),
    ] {
        let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(id.trust_domain(), td, "{s}");
        assert_eq!(id.path(), path, "{s}");
        assert_eq!(id.to_string(), s);
    }
    let long = format!("spiffe://td/{}", "a".repeat(2048 - "spiffe://td/".len()));
    assert!(SpiffeId::parse(&long).is_ok());
}

#[test]
fn invalid_ids() {
    let long = format!("spiffe://td/{}", "a".repeat(2049 - "spiffe://td/".len()));
    for (s, why) in [
        ("", "scheme"),
        ("http://example.org/x", "scheme"),
        ("SPIFFE://example.org/x", "scheme"),
        ("spiffe:/example.org/x", "scheme"),
        ("spiffe:///x", "empty"),
        ("spiffe://", "empty"),
        ("spiffe://Example.org/x", "lowercase"),
        ("spiffe://example.org:443/x", "port"),
        ("spiffe://user@example.org/x", "user info"),
        ("spiffe://exa mple.org/x", "may not contain"),
        ("spiffe://example.org/", "empty"),
        ("spiffe://example.org/x/", "empty"),
        ("spiffe://example.org//x", "empty"),
        ("spiffe://example.org/./x", "\".\""),
        ("spiffe://example.org/x/..", "\"..\""),
        ("spiffe://example.org/x?y=1", "query"),
        ("spiffe://example.org?y=1", "query"),
        ("spiffe://example.org/x#f", "fragment"),
        ("spiffe://example.org#f", "fragment"),
        ("spiffe://example.org/x%20y", "percent"),
        ("spiffe://example.org/x y", "may not contain"),
        ("spiffe://example.org/ü", "may not contain"),
        (long.as_str(), "longer than 2048"),
    ] {
        match SpiffeId::parse(s) {
            Ok(id) => panic!("{s:?} was accepted as {id}"),
            Err(e) => assert!(e.to_string().contains(why), "{s:?}: {e} (expected to mention {why:?})"),
        }
    }
}

#[test]
fn builders_and_roles() {
    let td = "example.org";
    let r = SpiffeId::registry(td).unwrap();
    assert_eq!(r.to_string(), "spiffe://example.org/registry");
    assert_eq!(r.role(), Role::Registry);
    let n = SpiffeId::node(td, "n1").unwrap();
    assert_eq!(n.path(), "/node/n1");
    assert_eq!(n.role(), Role::Node("n1"));
    assert_eq!(SpiffeId::admin(td, "alice").unwrap().role(), Role::Admin("alice"));
    assert_eq!(SpiffeId::user(td, "bob").unwrap().role(), Role::User("bob"));
    let c = SpiffeId::client(td, "default", "web").unwrap();
    assert_eq!(c.to_string(), "spiffe://example.org/ns/default/client/web");
    assert_eq!(
        c.role(),
        Role::Client {
            namespace: "default",
            name: "web"
        }
    );
    for other in [
        "spiffe://example.org",
        "spiffe://example.org/registry/x",
        "spiffe://example.org/node",
        "spiffe://example.org/node/a/b",
        "spiffe://example.org/ns/a/client",
        "spiffe://example.org/ns/a/server/b",
        "spiffe://example.org/something",
    ] {
        assert_eq!(SpiffeId::parse(other).unwrap().role(), Role::Other, "{other}");
    }
    // A name cannot smuggle in more segments, nor be empty.
    assert!(SpiffeId::node(td, "a/b").is_err());
    assert!(SpiffeId::node(td, "").is_err());
    assert!(SpiffeId::node(td, "..").is_err());
    assert!(SpiffeId::client(td, "ns/x", "y").is_err());
    assert!(SpiffeId::node("Bad.TD", "a").is_err());
    assert_eq!(
        SpiffeId::node(td, "n1").unwrap(),
        SpiffeId::parse("spiffe://example.org/node/n1").unwrap()
    );
}
