//! Authentication, scoping and input validation of every endpoint, on both
//! databases: no credential → 401, a credential of another kind → 403, a
//! site never reaches another site's data, bad input → 4xx JSON naming the
//! field, oversized bodies → 413, logins rate-limited → 429. And none of
//! these refused calls changes anything stored (fingerprint before = after).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use vpnnat::messages::*;

both!(
    every_endpoint_refuses_missing_and_foreign_credentials,
    a_site_cannot_reach_another_sites_data,
    bad_input_is_a_4xx_naming_the_field,
    oversized_bodies_are_refused,
    logins_are_rate_limited_and_need_csrf_for_changes,
);

struct World {
    db: TestDb,
    server: TestServer,
    gw: Gw,
    a: Site,
    b: Site,
    tech: Api,
    req_a: MaintenanceRequestView,
    req_b: MaintenanceRequestView,
}

async fn world(backend: Backend) -> World {
    let db = TestDb::new(backend);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let a = add_site(&server, "A", 1).await;
    let b = add_site(&server, "B", 2).await;
    let tech = technician(&server, &db, "alice", "correct horse").await;
    let req_a: MaintenanceRequestView = a
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    let req_b: MaintenanceRequestView = b
        .agent
        .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
        .await
        .json();
    World {
        db,
        server,
        gw,
        a,
        b,
        tech,
        req_a,
        req_b,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scope {
    Agent,
    Gateway,
    Operator,
    Technician,
}

/// Every authenticated endpoint with a body that would be valid.
fn endpoints(w: &World) -> Vec<(Scope, Method, String, Option<serde_json::Value>)> {
    let req = serde_json::to_value(new_request(&["pc-9"])).unwrap();
    let reg = serde_json::to_value(GatewayRegistration {
        endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
        public_key: key(201),
        tunnel_kinds: vec![TunnelKind::Wireguard],
        max_tunnels: 10,
        software_version: "x".into(),
        technician_prefixes: Vec::new(),
        tls: None,
        next_public_key: None,
    })
    .unwrap();
    let applied = serde_json::to_value(AppliedState {
        version: 1,
        errors: vec![],
    })
    .unwrap();
    let failure = serde_json::to_value(FailureReport {
        code: FailureCode::Other,
        detail: "x".into(),
        terminal: None,
        open_request: true,
    })
    .unwrap();
    let j = |v: serde_json::Value| Some(v);
    vec![
        (
            Scope::Agent,
            Method::POST,
            paths::AGENT_REQUESTS.into(),
            j(req),
        ),
        (
            Scope::Agent,
            Method::GET,
            paths::AGENT_REQUESTS.into(),
            None,
        ),
        (
            Scope::Agent,
            Method::POST,
            at(paths::AGENT_REVOKE, w.req_a.id),
            None,
        ),
        (
            Scope::Agent,
            Method::POST,
            paths::AGENT_FAILURES.into(),
            j(failure),
        ),
        (Scope::Agent, Method::GET, paths::AGENT_STATE.into(), None),
        (
            Scope::Agent,
            Method::POST,
            paths::AGENT_APPLIED.into(),
            j(applied.clone()),
        ),
        (
            Scope::Gateway,
            Method::POST,
            paths::GATEWAY_REGISTER.into(),
            j(reg),
        ),
        (
            Scope::Gateway,
            Method::POST,
            paths::GATEWAY_HEARTBEAT.into(),
            j(serde_json::to_value(heartbeat(10)).unwrap()),
        ),
        (
            Scope::Gateway,
            Method::GET,
            paths::GATEWAY_STATE.into(),
            None,
        ),
        (
            Scope::Gateway,
            Method::POST,
            paths::GATEWAY_APPLIED.into(),
            j(applied),
        ),
        (
            Scope::Operator,
            Method::POST,
            paths::SITES.into(),
            j(serde_json::json!({"name": "new"})),
        ),
        (Scope::Operator, Method::GET, paths::SITES.into(), None),
        (
            Scope::Operator,
            Method::POST,
            at(paths::SITE_TOKEN, w.a.id),
            None,
        ),
        (
            Scope::Operator,
            Method::POST,
            paths::GATEWAYS.into(),
            j(serde_json::json!({"name": "new"})),
        ),
        (Scope::Operator, Method::GET, paths::GATEWAYS.into(), None),
        (
            Scope::Operator,
            Method::POST,
            at(paths::GATEWAY_DRAIN, w.gw.id),
            j(serde_json::json!({"drain": true})),
        ),
        (Scope::Technician, Method::POST, paths::LOGOUT.into(), None),
        (Scope::Technician, Method::GET, paths::REQUESTS.into(), None),
        (
            Scope::Technician,
            Method::POST,
            at(paths::REQUEST_START, w.req_a.id),
            None,
        ),
        (
            Scope::Technician,
            Method::POST,
            at(paths::REQUEST_END, w.req_a.id),
            None,
        ),
        (Scope::Technician, Method::GET, paths::FAILURES.into(), None),
        (Scope::Technician, Method::GET, paths::AUDIT.into(), None),
        (
            Scope::Technician,
            Method::GET,
            paths::CONSOLE_EVENTS.into(),
            None,
        ),
        // The operator token (or the separate metrics token).
        (Scope::Operator, Method::GET, paths::METRICS.into(), None),
    ]
}

async fn every_endpoint_refuses_missing_and_foreign_credentials(backend: Backend) {
    let w = world(backend).await;
    let before = w.db.fingerprint().await;
    let anon = w.server.client(None);
    let op = w.server.operator();
    let site_cred = w.a.credential.clone();
    let gw_cred = w.gw.credential.clone();
    let op_cred = w.server.operator.clone();
    let bodies = |b: &Option<serde_json::Value>| b.as_ref().map(|v| serde_json::to_vec(v).unwrap());
    for (scope, method, path, body) in endpoints(&w) {
        let what = format!("{method} {path}");
        // No credential at all.
        let r = anon.raw(method.clone(), &path, bodies(&body)).await;
        r.error(401, None);
        assert_eq!(r.json::<ApiError>().error, "unauthorized", "{what}");
        // A well-formed but unknown credential of the right kind.
        let forged = match scope {
            Scope::Agent => Some("vnsite_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Scope::Gateway => Some("vngw_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Scope::Operator => Some("vnop_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Scope::Technician => None,
        };
        if let Some(f) = forged {
            anon.with_bearer(f)
                .raw(method.clone(), &path, bodies(&body))
                .await
                .error(401, None);
        }
        // Every credential of another kind: 403.
        for (kind, cred) in [
            (Scope::Agent, &site_cred),
            (Scope::Gateway, &gw_cred),
            (Scope::Operator, &op_cred),
        ] {
            if kind == scope {
                continue;
            }
            let r = anon
                .with_bearer(cred)
                .raw(method.clone(), &path, bodies(&body))
                .await;
            assert_eq!(
                r.status, 403,
                "{what} with a {kind:?} credential: {}",
                r.body
            );
            assert_eq!(r.json::<ApiError>().error, "forbidden");
        }
        // A technician session is no bearer credential.
        if scope != Scope::Technician {
            let mut t = w.tech.clone();
            t.bearer = None;
            let r = t.raw(method.clone(), &path, bodies(&body)).await;
            assert_eq!(r.status, 401, "{what} with a session cookie: {}", r.body);
        }
        // An expired or made-up session cookie.
        if scope == Scope::Technician {
            let mut t = anon.clone();
            t.cookie =
                Some("vpnnat_session=vnsess_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
            t.csrf = w.tech.csrf.clone();
            t.raw(method.clone(), &path, bodies(&body))
                .await
                .error(401, None);
        }
    }
    // Enrollment is authenticated by its token: a site credential is no token.
    anon.post(
        paths::ENROLL,
        &EnrollRequest {
            token: site_cred.clone(),
            public_key: key(77),
        },
    )
    .await
    .error(401, Some("token"));
    let _ = op;
    assert_eq!(
        w.db.fingerprint().await,
        before,
        "refused calls changed state"
    );
    w.server.stop().await;
}

async fn a_site_cannot_reach_another_sites_data(backend: Backend) {
    let w = world(backend).await;
    let before = w.db.fingerprint().await;
    // B cannot revoke A's request, and learns nothing about it (404, like a missing one).
    let e =
        w.b.agent
            .post_empty(&at(paths::AGENT_REVOKE, w.req_a.id))
            .await
            .error(404, None);
    let missing =
        w.b.agent
            .post_empty(&at(paths::AGENT_REVOKE, 999_999))
            .await
            .error(404, None);
    assert_eq!(e, missing);
    // B's lists and documents hold only B.
    let own: Vec<MaintenanceRequestView> = w.b.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(own.len(), 1);
    assert!(own.iter().all(|r| r.site_id == w.b.id));
    let state_b = agent_state(&w.b, 0, 0).await;
    assert_eq!(state_b.site_id, w.b.id);
    let a_addr = w.req_a.terminals[0].nat_address.unwrap();
    assert!(state_b.mappings.iter().all(|m| m.nat_address != a_addr));
    assert_eq!(state_b.mappings[0].request_id, w.req_b.id);
    // The same terminal name at two sites gets two addresses.
    assert_ne!(
        w.req_a.terminals[0].nat_address,
        w.req_b.terminals[0].nat_address
    );
    // A gateway sees the peers it carries, and cannot act for a site.
    let g = gateway_state(&w.gw, 0, 0).await;
    assert_eq!(g.peers.len(), 2);
    w.gw.api.get(paths::AGENT_REQUESTS).await.error(403, None);
    w.a.agent.get(paths::GATEWAY_STATE).await.error(403, None);
    w.a.agent.get(paths::REQUESTS).await.error(403, None);
    w.a.agent.get(paths::SITES).await.error(403, None);
    assert_eq!(w.db.fingerprint().await, before);
    // A can revoke its own.
    assert_eq!(
        w.a.agent
            .post_empty(&at(paths::AGENT_REVOKE, w.req_a.id))
            .await
            .status,
        200
    );
    // And B's request is untouched by that.
    let own: Vec<MaintenanceRequestView> = w.b.agent.get(paths::AGENT_REQUESTS).await.json();
    assert_eq!(own[0].state, RequestState::Waiting);
    w.server.stop().await;
}

async fn bad_input_is_a_4xx_naming_the_field(backend: Backend) {
    let w = world(backend).await;
    let before = w.db.fingerprint().await;
    let op = w.server.operator();
    let agent = &w.a.agent;
    let raw = |s: &str| Some(s.as_bytes().to_vec());
    // Malformed JSON: 400.
    for (api, path) in [
        (agent, paths::AGENT_REQUESTS),
        (agent, paths::AGENT_FAILURES),
        (agent, paths::AGENT_APPLIED),
        (&w.gw.api, paths::GATEWAY_REGISTER),
        (&w.gw.api, paths::GATEWAY_HEARTBEAT),
        (&w.gw.api, paths::GATEWAY_APPLIED),
        (&op, paths::SITES),
        (&op, paths::GATEWAYS),
    ] {
        api.raw(Method::POST, path, raw("{\"oops\""))
            .await
            .error(400, Some("body"));
        api.raw(Method::POST, path, raw(""))
            .await
            .error(400, Some("body"));
    }
    w.server
        .client(None)
        .raw(Method::POST, paths::ENROLL, raw("[1,2"))
        .await
        .error(400, Some("body"));
    // Wrong fields and values: 422 naming the field.
    let mut bad = serde_json::to_value(new_request(&["pc-1"])).unwrap();
    for (field, value) in [
        ("requester_name", serde_json::json!("")),
        ("phone", serde_json::json!("call me maybe")),
        ("level", serde_json::json!("boss")),
        ("urgency", serde_json::json!(7)),
        ("content", serde_json::json!("x".repeat(4001))),
        ("terminals", serde_json::json!([])),
        ("terminals", serde_json::json!(["pc 1"])),
        ("terminals", serde_json::json!(["a", "a"])),
    ] {
        let good = bad[field].clone();
        bad[field] = value;
        let e = agent
            .raw(
                Method::POST,
                paths::AGENT_REQUESTS,
                Some(serde_json::to_vec(&bad).unwrap()),
            )
            .await;
        assert_eq!(e.status, 422, "{field}: {}", e.body);
        let err: ApiError = e.json();
        assert!(
            err.field.as_deref().unwrap().starts_with(field),
            "{field}: {err:?}"
        );
        bad[field] = good;
    }
    let mut missing = serde_json::to_value(new_request(&["pc-1"])).unwrap();
    missing.as_object_mut().unwrap().remove("phone");
    agent
        .raw(
            Method::POST,
            paths::AGENT_REQUESTS,
            Some(serde_json::to_vec(&missing).unwrap()),
        )
        .await
        .error(422, Some("phone"));
    agent
        .raw(
            Method::POST,
            paths::AGENT_REQUESTS,
            raw(&serde_json::to_string(&{
                let mut v = serde_json::to_value(new_request(&["pc-1"])).unwrap();
                v["admin"] = true.into();
                v
            })
            .unwrap()),
        )
        .await
        .error(422, Some("admin"));
    agent
        .raw(
            Method::POST,
            paths::AGENT_FAILURES,
            raw(r#"{"code":"meltdown","detail":""}"#),
        )
        .await
        .error(422, Some("code"));
    agent
        .raw(
            Method::POST,
            paths::AGENT_FAILURES,
            raw(&format!(
                r#"{{"code":"other","detail":"{}"}}"#,
                "x".repeat(2001)
            )),
        )
        .await
        .error(422, Some("detail"));
    agent
        .raw(Method::POST, paths::AGENT_APPLIED, raw(r#"{"version":-1}"#))
        .await
        .error(422, Some("version"));
    let reg = |patch: serde_json::Value| {
        let mut v = serde_json::to_value(GatewayRegistration {
            endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
            public_key: key(201),
            tunnel_kinds: vec![TunnelKind::Wireguard],
            max_tunnels: 10,
            software_version: "x".into(),
            technician_prefixes: Vec::new(),
            tls: None,
            next_public_key: None,
        })
        .unwrap();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::to_vec(&v).unwrap()
    };
    for (field, patch) in [
        ("max_tunnels", serde_json::json!({"max_tunnels": 0})),
        ("endpoints", serde_json::json!({"endpoints": []})),
        (
            "endpoints",
            serde_json::json!({"endpoints": ["0.0.0.0:51820"]}),
        ),
        ("endpoints", serde_json::json!({"endpoints": ["nowhere"]})),
        ("public_key", serde_json::json!({"public_key": "short"})),
        ("tunnel_kinds", serde_json::json!({"tunnel_kinds": ["ipx"]})),
    ] {
        let e =
            w.gw.api
                .raw(Method::POST, paths::GATEWAY_REGISTER, Some(reg(patch)))
                .await;
        assert_eq!(e.status, 422, "{field}: {}", e.body);
        assert!(e.json::<ApiError>().field.unwrap().starts_with(field));
    }
    let mut hb = serde_json::to_value(heartbeat(10)).unwrap();
    hb["health"] = "down".into();
    w.gw.api
        .raw(
            Method::POST,
            paths::GATEWAY_HEARTBEAT,
            Some(serde_json::to_vec(&hb).unwrap()),
        )
        .await
        .error(422, Some("health"));
    op.post(
        paths::SITES,
        &NewSite {
            name: " ".into(),
            tunnel: TunnelKind::Wireguard,
            ..Default::default()
        },
    )
    .await
    .error(422, Some("name"));
    op.post(
        paths::SITES,
        &NewSite {
            name: "x".repeat(101),
            tunnel: TunnelKind::Wireguard,
            ..Default::default()
        },
    )
    .await
    .error(422, Some("name"));
    op.post(
        paths::GATEWAYS,
        &NewGateway {
            name: String::new(),
        },
    )
    .await
    .error(422, Some("name"));
    op.raw(
        Method::POST,
        &at(paths::GATEWAY_DRAIN, w.gw.id),
        raw(r#"{"drain":"yes"}"#),
    )
    .await
    .error(422, Some("drain"));
    w.server
        .client(None)
        .post(
            paths::ENROLL,
            &serde_json::json!({"token": "", "public_key": key(5)}),
        )
        .await
        .error(422, Some("token"));
    // Bad path ids and query parameters: 400; unknown objects: 404.
    op.post_empty(&at(paths::SITE_TOKEN, "abc"))
        .await
        .error(400, Some("id"));
    op.post_empty(&at(paths::SITE_TOKEN, 0))
        .await
        .error(400, Some("id"));
    op.post_empty(&at(paths::SITE_TOKEN, 4242))
        .await
        .error(404, None);
    op.post(
        &at(paths::GATEWAY_DRAIN, 4242),
        &DrainGateway { drain: true },
    )
    .await
    .error(404, None);
    agent
        .post_empty(&at(paths::AGENT_REVOKE, "-1"))
        .await
        .error(400, Some("id"));
    w.tech
        .post_empty(&at(paths::REQUEST_START, "x"))
        .await
        .error(400, Some("id"));
    w.tech
        .get(&format!("{}?state=bogus", paths::REQUESTS))
        .await
        .error(400, Some("state"));
    w.tech
        .get(&format!("{}?site=x", paths::REQUESTS))
        .await
        .error(400, Some("site"));
    w.tech
        .get(&format!("{}?colour=red", paths::REQUESTS))
        .await
        .error(400, Some("colour"));
    w.tech
        .get(&format!("{}?before=x", paths::AUDIT))
        .await
        .error(400, Some("before"));
    agent
        .get(&format!("{}?after=1.5", paths::AGENT_STATE))
        .await
        .error(400, Some("after"));
    w.server
        .client(None)
        .get("/api/v1/nothing")
        .await
        .error(404, None);
    // A request no gateway can take does not count as bad input and is handled elsewhere.
    assert_eq!(
        w.db.fingerprint().await,
        before,
        "refused input changed state"
    );
    w.server.stop().await;
}

async fn oversized_bodies_are_refused(backend: Backend) {
    let w = world(backend).await;
    let before = w.db.fingerprint().await;
    let mut big = serde_json::to_value(new_request(&["pc-1"])).unwrap();
    big["content"] = "x".repeat(70_000).into();
    let body = serde_json::to_vec(&big).unwrap();
    for (api, path) in [
        (&w.a.agent, paths::AGENT_REQUESTS),
        (&w.a.agent, paths::AGENT_FAILURES),
        (&w.gw.api, paths::GATEWAY_REGISTER),
        (&w.gw.api, paths::GATEWAY_HEARTBEAT),
    ] {
        let e = api
            .raw(Method::POST, path, Some(body.clone()))
            .await
            .error(413, None);
        assert_eq!(e.error, "body_too_large");
    }
    w.server
        .client(None)
        .raw(Method::POST, paths::ENROLL, Some(body.clone()))
        .await
        .error(413, None);
    w.server
        .client(None)
        .raw(Method::POST, paths::LOGIN, Some(body))
        .await
        .error(413, None);
    assert_eq!(w.db.fingerprint().await, before);
    w.server.stop().await;
}

async fn logins_are_rate_limited_and_need_csrf_for_changes(backend: Backend) {
    let w = world(backend).await;
    let before = w.db.fingerprint().await;
    let anon = w.server.client(None);
    // CSRF: the session cookie alone cannot change anything.
    let mut no_csrf = w.tech.clone();
    no_csrf.csrf = None;
    no_csrf
        .post_empty(&at(paths::REQUEST_START, w.req_a.id))
        .await
        .error(403, None);
    let mut wrong = w.tech.clone();
    wrong.csrf = Some("vncsrf_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    wrong
        .post_empty(&at(paths::REQUEST_END, w.req_a.id))
        .await
        .error(403, None);
    wrong.post_empty(paths::LOGOUT).await.error(403, None);
    // ... but may read.
    assert_eq!(no_csrf.get(paths::REQUESTS).await.status, 200);
    // Wrong passwords, unknown names: 401, then 429 for everyone from here,
    // even with the right password.
    let limit = w.db.settings().technicians.login_attempts_per_minute;
    for i in 0..limit {
        let name = if i % 2 == 0 { "alice" } else { "mallory" };
        anon.post(
            paths::LOGIN,
            &Login {
                name: name.into(),
                password: "guess".into(),
            },
        )
        .await
        .error(401, None);
    }
    let e = anon
        .post(
            paths::LOGIN,
            &Login {
                name: "alice".into(),
                password: "correct horse".into(),
            },
        )
        .await
        .error(429, None);
    assert_eq!(e.error, "rate_limited");
    anon.post(
        paths::LOGIN,
        &Login {
            name: String::new(),
            password: "x".into(),
        },
    )
    .await
    .error(422, Some("name"));
    // Each refused sign-in is audited (which also wakes the console's
    // feed); the 429s are not, and nothing else changed.
    let mut expected = before.clone();
    expected[13] += i64::from(limit);
    expected[14] += i64::from(limit);
    assert_eq!(w.db.fingerprint().await, expected);
    w.server.stop().await;
}
