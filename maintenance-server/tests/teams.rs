//! Teams of technicians, on both databases: each technician sees and acts
//! on only its team's sites (and those without a team) in the request list,
//! start / end, failures and their acknowledgement, the audit view and the
//! console feed, and gets 404 for the others; the operator sees every team;
//! the gateway's desired state carries the sources allowed to reach each
//! NAT address (the team's while waiting, the starter's once started); bad
//! input is refused with the field named.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::*;
use reqwest::Method;
use serde_json::json;
use vpnnat::ipv4::Prefix;
use vpnnat::messages::*;

both!(
    teams_scope_what_technicians_see_and_do,
    teams_fill_the_gateways_allowed_sources,
    teams_refuse_bad_input,
    teams_cli_manages_teams,
    teams_scope_sites_without_an_agent,
);

/// The console shows the team's name next to the technician's, and only
/// the requests of its team's sites and of sites without a team.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_console_shows_the_team_and_its_requests() {
    use vpnnat_test_support::browser::{Browser, require_browser};
    if !require_browser() {
        return;
    }
    let w = world(Backend::Sqlite).await;
    let [a, b, c] = &w.reqs;
    let requests_text = async |br: &Browser| {
        br.c()
            .execute(
                "return document.getElementById('requests').innerText;",
                vec![],
            )
            .await
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    };
    let br = Browser::start(1366, 900).await;
    br.c().goto(&w.server.base).await.unwrap();
    br.type_into("#login-name", "alice").await;
    br.type_into("#login-password", "correct horse").await;
    br.click("#login-submit").await;
    br.wait_text("#who", "alice").await;
    br.wait_text("#team", "north").await;
    br.wait_text("#requests", &a.acceptance_number).await;
    br.wait_text("#requests", &c.acceptance_number).await;
    let text = requests_text(&br).await;
    assert!(!text.contains(&b.acceptance_number), "{text}");
    br.close().await;

    // Without a team: no label, only the site without a team.
    let br = Browser::start(1366, 900).await;
    br.c().goto(&w.server.base).await.unwrap();
    br.type_into("#login-name", "carol").await;
    br.type_into("#login-password", "correct horse").await;
    br.click("#login-submit").await;
    br.wait_text("#who", "carol").await;
    br.wait_text("#requests", &c.acceptance_number).await;
    let text = requests_text(&br).await;
    assert!(!text.contains(&a.acceptance_number), "{text}");
    assert!(!text.contains(&b.acceptance_number), "{text}");
    let team_hidden = br
        .c()
        .execute("return document.getElementById('team').hidden;", vec![])
        .await
        .unwrap();
    assert_eq!(team_hidden, true);
    br.close().await;
    w.server.stop().await;
}

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn tech_path(path: &str, name: &str) -> String {
    path.replace("{name}", name)
}

/// Two teams, three sites (A of north, B of south, C of none), three
/// technicians (alice of north with own sources, bob of south, carol of
/// none), a gateway carrying them all, and a waiting request per site.
struct World {
    db: TestDb,
    server: TestServer,
    gw: Gw,
    north: TeamView,
    south: TeamView,
    sites: [Site; 3],
    reqs: [MaintenanceRequestView; 3],
    alice: Api,
    bob: Api,
    carol: Api,
}

async fn create_team(server: &TestServer, name: &str, sources: &[&str]) -> TeamView {
    let a = server
        .operator()
        .post(
            paths::TEAMS,
            &NewTeam {
                name: name.into(),
                source_prefixes: sources.iter().map(|s| p(s)).collect(),
            },
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.json()
}

async fn set_site_team(server: &TestServer, site: SiteId, team: Option<u64>) {
    let a = server
        .operator()
        .post(&at(paths::SITE_TEAM, site), &SiteTeam { team })
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
}

async fn set_tech_team(
    server: &TestServer,
    name: &str,
    team: Option<u64>,
    sources: Option<&[&str]>,
) {
    let a = server
        .operator()
        .post(
            &tech_path(paths::TECHNICIAN_TEAM, name),
            &TechnicianTeam {
                team,
                sources: sources.map(|s| s.iter().map(|x| p(x)).collect()),
            },
        )
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
}

async fn world(backend: Backend) -> World {
    let db = TestDb::new(backend);
    let server = TestServer::start(db.settings()).await;
    let gw = add_gateway(&server, "gw1", 10, 1).await;
    let sites = [
        add_site(&server, "A", 1).await,
        add_site(&server, "B", 2).await,
        add_site(&server, "C", 3).await,
    ];
    let north = create_team(&server, "north", &["172.16.0.48/30"]).await;
    let south = create_team(&server, "south", &["172.16.0.64/30", "172.16.0.80/32"]).await;
    set_site_team(&server, sites[0].id, Some(north.id)).await;
    set_site_team(&server, sites[1].id, Some(south.id)).await;
    for name in ["alice", "bob", "carol"] {
        add_technician(&db, name, "correct horse").await;
    }
    set_tech_team(&server, "alice", Some(north.id), Some(&["172.16.0.50/32"])).await;
    set_tech_team(&server, "bob", Some(south.id), None).await;
    let mut reqs = Vec::new();
    for s in &sites {
        let r = s
            .agent
            .post(paths::AGENT_REQUESTS, &new_request(&["pc-1"]))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        reqs.push(r.json::<MaintenanceRequestView>());
    }
    let alice = login(&server, "alice", "correct horse").await;
    let bob = login(&server, "bob", "correct horse").await;
    let carol = login(&server, "carol", "correct horse").await;
    World {
        db,
        server,
        gw,
        north,
        south,
        sites,
        reqs: reqs.try_into().unwrap(),
        alice,
        bob,
        carol,
    }
}

fn ids(v: &[MaintenanceRequestView]) -> BTreeSet<u64> {
    v.iter().map(|r| r.id.0).collect()
}

fn nat(r: &MaintenanceRequestView) -> Ipv4Addr {
    r.terminals[0].nat_address.unwrap()
}

async fn teams_scope_what_technicians_see_and_do(backend: Backend) {
    let w = world(backend).await;
    let [a, b, c] = &w.reqs;
    let failure = |site: &Site| {
        let agent = site.agent.clone();
        async move {
            let f: FailureAccepted = agent
                .post(
                    paths::AGENT_FAILURES,
                    &FailureReport {
                        code: FailureCode::TerminalUnreachable,
                        detail: "nas does not answer".into(),
                        terminal: None,
                        open_request: false,
                    },
                )
                .await
                .json();
            f.failure_id
        }
    };
    let fa = failure(&w.sites[0]).await;
    let fb = failure(&w.sites[1]).await;
    let fc = failure(&w.sites[2]).await;

    // Who is signed in, with the team's name.
    let me = w.alice.get("/api/v1/me").await;
    assert_eq!(me.body["team"], "north", "{}", me.body);
    let me = w.carol.get("/api/v1/me").await;
    assert!(me.body.get("team").is_none(), "{}", me.body);

    // The request list.
    for (tech, want) in [
        (&w.alice, [a, c].as_slice()),
        (&w.bob, [b, c].as_slice()),
        (&w.carol, [c].as_slice()),
    ] {
        let got: Vec<MaintenanceRequestView> = tech.get(paths::REQUESTS).await.json();
        let want: BTreeSet<u64> = want.iter().map(|r| r.id.0).collect();
        assert_eq!(ids(&got), want);
    }
    // Asking for the other team's site by id finds nothing.
    let got: Vec<MaintenanceRequestView> = w
        .alice
        .get(&format!("{}?site={}", paths::REQUESTS, w.sites[1].id))
        .await
        .json();
    assert!(got.is_empty());

    // Failures.
    for (tech, want) in [
        (&w.alice, vec![fa, fc]),
        (&w.bob, vec![fb, fc]),
        (&w.carol, vec![fc]),
    ] {
        let got: Vec<FailureView> = tech.get(paths::FAILURES).await.json();
        let got: BTreeSet<u64> = got.iter().map(|f| f.id).collect();
        assert_eq!(got, want.into_iter().collect::<BTreeSet<_>>());
    }

    // The console feed.
    let ev: ConsoleEvents = w.alice.get(paths::CONSOLE_EVENTS).await.json();
    assert_eq!(ids(&ev.requests), [a.id.0, c.id.0].into());
    assert_eq!(
        ev.failures.iter().map(|f| f.id).collect::<BTreeSet<_>>(),
        [fa, fc].into()
    );

    // Acting on another team's request or failure: 404, as if it did not
    // exist, and nothing changes. (The failure reports bump the console
    // feed at the background task's next tick: wait for that first.)
    let settled: ConsoleEvents = w
        .alice
        .get(&format!(
            "{}?after={}&wait_ms=3000",
            paths::CONSOLE_EVENTS,
            ev.version
        ))
        .await
        .json();
    assert!(settled.version >= ev.version);
    let before = w.db.fingerprint().await;
    for (tech, req, fail) in [(&w.alice, b, fb), (&w.bob, a, fa), (&w.carol, a, fa)] {
        for path in [paths::REQUEST_START, paths::REQUEST_END] {
            let r = tech.post_empty(&at(path, req.id)).await;
            assert_eq!(r.status, 404, "{path} {}", r.body);
            let e: ApiError = r.json();
            assert_eq!(e.error, "not_found");
        }
        let r = tech.post_empty(&at(paths::FAILURE_ACK, fail)).await;
        assert_eq!(r.status, 404, "{}", r.body);
    }
    // The same answer as for an id that does not exist at all.
    let none = w.alice.post_empty(&at(paths::REQUEST_START, 99_999)).await;
    let other = w.alice.post_empty(&at(paths::REQUEST_START, b.id)).await;
    assert_eq!(none.body, other.body);
    assert_eq!(
        w.db.fingerprint().await,
        before,
        "refused actions changed state"
    );

    // The check other technician-facing handlers taking a site id use.
    {
        use maintenance_server::db::teams::{TeamScope, site_visible};
        let d = maintenance_server::db::Database::connect(&w.db.url, 1)
            .await
            .unwrap();
        let mut c = d.reader().acquire().await.unwrap();
        let north = TeamScope {
            team: Some(i64::try_from(w.north.id).unwrap()),
        };
        let none = TeamScope { team: None };
        for (site, scope, want) in [
            (w.sites[0].id, north, true),
            (w.sites[1].id, north, false),
            (w.sites[2].id, north, true),
            (w.sites[0].id, none, false),
            (w.sites[2].id, none, true),
            (SiteId(99_999), north, false),
        ] {
            assert_eq!(
                site_visible(&mut c, site, scope).await.unwrap(),
                want,
                "{site} {scope:?}"
            );
        }
    }

    // Their own: allowed.
    let r = w.alice.post_empty(&at(paths::REQUEST_START, a.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = w.alice.post_empty(&at(paths::FAILURE_ACK, fa)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = w.bob.post_empty(&at(paths::REQUEST_START, b.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = w.carol.post_empty(&at(paths::REQUEST_START, c.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = w.bob.post_empty(&at(paths::REQUEST_END, b.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The audit view: nothing by, on or about the other team's site.
    let about = |entries: &[AuditEntry], site: SiteId, req: RequestId, fail: u64| {
        entries.iter().any(|e| {
            e.actor == format!("site:{site}")
                || e.object == format!("site:{site}")
                || e.object == format!("request:{req}")
                || e.object == format!("failure:{fail}")
        })
    };
    let audit_of = |tech: &Api| {
        let tech = tech.clone();
        async move {
            let r = tech.get(&format!("{}?limit=500", paths::AUDIT)).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json::<Vec<AuditEntry>>()
        }
    };
    let (sa, sb, sc) = (w.sites[0].id, w.sites[1].id, w.sites[2].id);
    let alice_audit = audit_of(&w.alice).await;
    assert!(about(&alice_audit, sa, a.id, fa));
    assert!(about(&alice_audit, sc, c.id, fc));
    assert!(!about(&alice_audit, sb, b.id, fb), "{alice_audit:?}");
    // Nor about the other team or its technicians.
    assert!(
        !alice_audit.iter().any(|e| e.actor == "technician:bob"
            || e.object == "technician:bob"
            || e.object == format!("team:{}", w.south.id)),
        "{alice_audit:?}"
    );
    assert!(alice_audit.iter().any(|e| e.actor == "technician:alice"));
    assert!(
        alice_audit
            .iter()
            .any(|e| e.object == format!("team:{}", w.north.id))
    );
    let bob_audit = audit_of(&w.bob).await;
    assert!(!bob_audit.iter().any(|e| e.actor == "technician:alice"));
    assert!(about(&bob_audit, sb, b.id, fb));
    assert!(!about(&bob_audit, sa, a.id, fa));
    let carol_audit = audit_of(&w.carol).await;
    assert!(about(&carol_audit, sc, c.id, fc));
    assert!(!about(&carol_audit, sa, a.id, fa));
    assert!(!about(&carol_audit, sb, b.id, fb));
    // A filter by the other site finds nothing either.
    let r: Vec<AuditEntry> = w
        .alice
        .get(&format!("{}?site={sb}", paths::AUDIT))
        .await
        .json();
    assert!(r.is_empty(), "{r:?}");

    // The operator sees every team, its sites and its technicians, and the
    // audit records the operator's assignments.
    let teams: Vec<TeamView> = w.server.operator().get(paths::TEAMS).await.json();
    assert_eq!(teams.len(), 2);
    assert_eq!(teams[0].name, "north");
    assert_eq!(teams[0].sites, vec![sa]);
    assert_eq!(teams[0].technicians, vec!["alice".to_owned()]);
    assert_eq!(teams[1].sites, vec![sb]);
    assert_eq!(teams[1].technicians, vec!["bob".to_owned()]);
    assert_eq!(
        teams[1].source_prefixes,
        vec![p("172.16.0.64/30"), p("172.16.0.80/32")]
    );
    assert!(
        carol_audit
            .iter()
            .all(|e| e.action != "site.team" || !e.object.ends_with(&sa.to_string()))
    );
    assert_eq!(
        w.db.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'site.team'")
            .await,
        2
    );

    // Moving site A to no team shows it to everyone; a team that still has
    // sites cannot be deleted, an empty one can (its technicians then have
    // no team).
    let op = w.server.operator();
    op.raw(Method::DELETE, &at(paths::TEAM, w.north.id), None)
        .await
        .error(409, Some("id"));
    set_site_team(&w.server, sa, None).await;
    let got: Vec<MaintenanceRequestView> = w.carol.get(paths::REQUESTS).await.json();
    assert!(ids(&got).contains(&a.id.0));
    let r = op
        .raw(Method::DELETE, &at(paths::TEAM, w.north.id), None)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let me = w.alice.get("/api/v1/me").await;
    assert!(me.body.get("team").is_none(), "{}", me.body);
    let got: Vec<MaintenanceRequestView> = w.alice.get(paths::REQUESTS).await.json();
    assert_eq!(ids(&got), [a.id.0, c.id.0].into(), "B is south's");
    op.raw(Method::DELETE, &at(paths::TEAM, w.north.id), None)
        .await
        .error(404, None);
    let _ = &w.south;
    w.server.stop().await;
}

fn allowed(state: &GatewayDesiredState, nat: Ipv4Addr) -> Option<Vec<Prefix>> {
    state
        .allowed_sources
        .iter()
        .find(|a| a.nat_address == nat)
        .map(|a| a.sources.clone())
}

async fn teams_fill_the_gateways_allowed_sources(backend: Backend) {
    let w = world(backend).await;
    let [a, b, c] = &w.reqs;
    let s0 = gateway_state(&w.gw, 0, 0).await;
    // Waiting: the team's prefixes; a site without a team: not listed.
    assert_eq!(allowed(&s0, nat(a)), Some(vec![p("172.16.0.48/30")]));
    assert_eq!(
        allowed(&s0, nat(b)),
        Some(vec![p("172.16.0.64/30"), p("172.16.0.80/32")])
    );
    assert_eq!(allowed(&s0, nat(c)), None);
    assert_eq!(s0.allowed_sources.len(), 2);
    // On the wire (an older gateway ignores the unknown field).
    let raw =
        w.gw.api
            .get(&format!("{}?after=0&wait_ms=0", paths::GATEWAY_STATE))
            .await;
    assert!(raw.body.get("allowed_sources").is_some());

    // Started by alice (own sources): hers only; a new version.
    let r = w.alice.post_empty(&at(paths::REQUEST_START, a.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s1 = gateway_state(&w.gw, s0.version, 5_000).await;
    assert!(s1.version > s0.version);
    assert_eq!(allowed(&s1, nat(a)), Some(vec![p("172.16.0.50/32")]));
    // Started by bob (no own sources): still his team's.
    let r = w.bob.post_empty(&at(paths::REQUEST_START, b.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s2 = gateway_state(&w.gw, s1.version, 5_000).await;
    assert_eq!(
        allowed(&s2, nat(b)),
        Some(vec![p("172.16.0.64/30"), p("172.16.0.80/32")])
    );
    // Starting a team-less site's request changes nothing for the gateway.
    let r = w.carol.post_empty(&at(paths::REQUEST_START, c.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(allowed(&gateway_state(&w.gw, 0, 0).await, nat(c)), None);

    // The operator changes alice's sources: the gateway follows at once.
    set_tech_team(
        &w.server,
        "alice",
        Some(w.north.id),
        Some(&["172.16.0.49/32"]),
    )
    .await;
    let s3 = gateway_state(&w.gw, s2.version, 5_000).await;
    assert_eq!(allowed(&s3, nat(a)), Some(vec![p("172.16.0.49/32")]));
    // Without own sources: the team's.
    set_tech_team(&w.server, "alice", Some(w.north.id), None).await;
    let s4 = gateway_state(&w.gw, s3.version, 5_000).await;
    assert_eq!(allowed(&s4, nat(a)), Some(vec![p("172.16.0.48/30")]));

    // Ended: the address goes back to the pool and off the list.
    let r = w.alice.post_empty(&at(paths::REQUEST_END, a.id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s5 = gateway_state(&w.gw, s4.version, 5_000).await;
    assert_eq!(allowed(&s5, nat(a)), None);

    // Site B leaves its team: its addresses are open to every technician.
    set_site_team(&w.server, w.sites[1].id, None).await;
    let s6 = gateway_state(&w.gw, s5.version, 5_000).await;
    assert_eq!(allowed(&s6, nat(b)), None);
    assert!(s6.allowed_sources.is_empty());
    let raw =
        w.gw.api
            .get(&format!("{}?after=0&wait_ms=0", paths::GATEWAY_STATE))
            .await;
    assert!(
        raw.body.get("allowed_sources").is_none(),
        "absent when nothing is restricted: {}",
        raw.body
    );
    w.server.stop().await;
}

async fn teams_refuse_bad_input(backend: Backend) {
    let w = world(backend).await;
    let op = w.server.operator();
    let before = w.db.fingerprint().await;
    let raw = |path: &str, body: &str| {
        let op = op.clone();
        let path = path.to_owned();
        let body = body.as_bytes().to_vec();
        async move { op.raw(Method::POST, &path, Some(body)).await }
    };
    // Teams.
    raw(
        paths::TEAMS,
        r#"{"name":"x","source_prefixes":["300.0.0.0/8"]}"#,
    )
    .await
    .error(422, Some("source_prefixes[0]"));
    raw(
        paths::TEAMS,
        r#"{"name":"x","source_prefixes":["10.0.0.0/8","10.0.0.0/33"]}"#,
    )
    .await
    .error(422, Some("source_prefixes[1]"));
    let r = raw(paths::TEAMS, r#"{"name":"x"}"#).await;
    assert!(r.status.is_client_error(), "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("source_prefixes")
    );
    raw(paths::TEAMS, r#"{"name":"","source_prefixes":[]}"#)
        .await
        .error(422, Some("name"));
    raw(paths::TEAMS, r#"{"name":"north","source_prefixes":[]}"#)
        .await
        .error(409, Some("name"));
    let r = raw(
        paths::TEAMS,
        r#"{"name":"x","source_prefixes":[],"extra":1}"#,
    )
    .await;
    assert!(r.status.is_client_error(), "{}", r.body);
    let many: Vec<String> = (0..65).map(|i| format!("\"10.0.{i}.0/24\"")).collect();
    raw(
        paths::TEAMS,
        &format!(r#"{{"name":"x","source_prefixes":[{}]}}"#, many.join(",")),
    )
    .await
    .error(422, Some("source_prefixes"));
    // Site assignment.
    raw(&at(paths::SITE_TEAM, w.sites[0].id), r#"{"team":99999}"#)
        .await
        .error(422, Some("team"));
    raw(&at(paths::SITE_TEAM, w.sites[0].id), r#"{"team":"north"}"#)
        .await
        .error(422, Some("team"));
    raw(&at(paths::SITE_TEAM, 99_999), r#"{"team":null}"#)
        .await
        .error(404, None);
    raw(&at(paths::SITE_TEAM, "x"), r#"{"team":null}"#)
        .await
        .error(400, Some("id"));
    // Technician assignment.
    let t = tech_path(paths::TECHNICIAN_TEAM, "alice");
    raw(&t, r#"{"team":99999}"#).await.error(422, Some("team"));
    raw(&t, r#"{"team":null,"sources":["1.2.3"]}"#)
        .await
        .error(422, Some("sources[0]"));
    raw(
        &t,
        &format!(r#"{{"team":null,"sources":[{}]}}"#, many.join(",")),
    )
    .await
    .error(422, Some("sources"));
    raw(
        &tech_path(paths::TECHNICIAN_TEAM, "nobody"),
        r#"{"team":null}"#,
    )
    .await
    .error(404, None);
    // Deleting.
    op.raw(Method::DELETE, &at(paths::TEAM, "0"), None)
        .await
        .error(400, Some("id"));
    op.raw(Method::DELETE, &at(paths::TEAM, 99_999), None)
        .await
        .error(404, None);
    // Only the operator: a technician's session or a site credential is refused.
    let mut alice = w.alice.clone();
    alice.bearer = None;
    for (m, path) in [
        (Method::GET, paths::TEAMS.to_owned()),
        (Method::POST, at(paths::SITE_TEAM, w.sites[1].id)),
        (Method::POST, tech_path(paths::TECHNICIAN_TEAM, "alice")),
        (Method::DELETE, at(paths::TEAM, w.south.id)),
    ] {
        let body = (m == Method::POST).then(|| br#"{"team":null}"#.to_vec());
        let r = alice.raw(m.clone(), &path, body.clone()).await;
        assert_eq!(r.status, 401, "{m} {path}: {}", r.body);
        let r = w.sites[0].agent.raw(m.clone(), &path, body).await;
        assert_eq!(r.status, 403, "{m} {path}: {}", r.body);
    }
    assert_eq!(
        w.db.fingerprint().await,
        before,
        "refused calls changed state"
    );
    w.server.stop().await;
}

/// The operator CLI on the database directly: teams, assignments, listing,
/// refusals with a non-zero exit.
async fn teams_cli_manages_teams(backend: Backend) {
    use std::process::Output;
    let db = TestDb::new(backend);
    let config = db.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[state]\ndir = \"{}\"\n[database]\nurl = \"{}\"\n",
            db.dir.path().join("state").display(),
            db.url
        ),
    )
    .unwrap();
    let run = |args: &[&str]| -> Output {
        use std::io::Write as _;
        use std::process::Stdio;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_maintenance-server"))
            .env_remove("RUST_LOG")
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The password, for `technician add --password-stdin`.
        let _ = child.stdin.take().unwrap().write_all(b"correct horse\n");
        child.wait_with_output().unwrap()
    };
    let ok = |args: &[&str]| -> String {
        let o = run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let fails = |args: &[&str]| -> String {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    ok(&["site", "add", "Bakery"]);
    ok(&["technician", "add", "alice", "--password-stdin"]);
    let out = ok(&["team", "add", "north", "--source", "172.16.0.48/30"]);
    assert!(out.starts_with("team 1: north"), "{out}");
    ok(&["team", "site", "1", "--team", "1"]);
    ok(&[
        "team",
        "technician",
        "alice",
        "--team",
        "1",
        "--source",
        "172.16.0.50/32",
    ]);
    let list = ok(&["team", "list"]);
    let row = list.lines().nth(1).unwrap();
    for want in ["north", "172.16.0.48/30", "alice"] {
        assert!(row.contains(want), "{list}");
    }
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM audit_log WHERE action IN ('team.create', 'site.team', 'technician.team')")
            .await,
        3
    );
    // Refusals: a bad prefix, a taken name, an unknown team, a team with sites.
    assert!(fails(&["team", "add", "x", "--source", "10.0.0.0/33"]).contains("0 to 32"));
    assert!(fails(&["team", "add", "north"]).contains("north"));
    fails(&["team", "site", "1", "--team", "9"]);
    fails(&["team", "site", "1"]);
    fails(&["team", "delete", "1"]);
    ok(&["team", "site", "1", "--none"]);
    ok(&["team", "delete", "1"]);
    let list = ok(&["team", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
}

/// A site without an agent of team north: its router files, its place in
/// the console feed and requests opened for it on the phone are for north's
/// technicians (and those of no team only when the site has none) — another
/// team gets 404, as for a site that does not exist.
async fn teams_scope_sites_without_an_agent(backend: Backend) {
    let w = world(backend).await;
    let created = w
        .server
        .operator()
        .post(paths::SITES, &json!({ "name": "Bakery", "agent": false }))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let site = SiteId(created.body["site_id"].as_u64().unwrap());
    set_site_team(&w.server, site, Some(w.north.id)).await;
    let files = at(paths::SITE_WIREGUARD, site);
    let requests = at(paths::SITE_REQUESTS, site);
    let phoned = json!({
        "requester_name": "Anna Schmidt",
        "level": "general",
        "urgency": "high",
        "phone": "+49 30 1234 567",
        "content": "The till does not print.",
        "terminals": [{ "name": "till", "lan_address": "192.168.1.10" }],
    });
    let listed = |a: &Answer| {
        a.body["agentless_sites"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["site_id"] == json!(site.0)))
    };
    // Team south and a technician without a team: as if it did not exist.
    for other in [&w.bob, &w.carol] {
        let a = other.get(&files).await;
        assert_eq!(a.status, 404, "{}", a.body);
        let a = other.post(&requests, &phoned).await;
        assert_eq!(a.status, 404, "{}", a.body);
        assert!(!listed(&other.get(paths::CONSOLE_EVENTS).await));
    }
    // Team north: its files, its console entry, its phoned-in request.
    let a = w.alice.get(&files).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(listed(&w.alice.get(paths::CONSOLE_EVENTS).await));
    let a = w.alice.post(&requests, &phoned).await;
    assert_eq!(a.status, 201, "{}", a.body);
    // The operator sees it all.
    assert_eq!(w.server.operator().get(&files).await.status, 200);
    // Without a team, every technician may act on it again.
    set_site_team(&w.server, site, None).await;
    assert_eq!(w.carol.get(&files).await.status, 200);
    w.server.stop().await;
}
