//! Engines beyond the local socket: a Docker engine over tcp with TLS (reached through
//! `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`, `DOCKER_CONTEXT` and `currentContext`), Docker and
//! Podman over ssh, and the bad input around them: each one clear error naming the engine
//! and the fix, within a bounded time, with nothing left behind and no secret shown.
//!
//! `scripts/setup.sh` starts the TLS engine (tcp://127.0.0.1:2376, also on a unix socket the
//! tests read its state through) and sshd on 127.0.0.1:2222.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;
use crate::registry_harness::ClosedPort;

const TLS_HOST: &str = "tcp://127.0.0.1:2376";
const TLS_DIR: &str = "/etc/nixctr-test/tls";
const TLS_CLIENT: &str = "/etc/nixctr-test/tls/client";
const SSH_URL: &str = "ssh://root@127.0.0.1:2222";
const SSH_DIR: &str = "/etc/nixctr-test/ssh";
/// Bad input fails within this (ssh's connect timeout is 10 s, the tunnel's setup 25 s).
const FAILS_WITHIN: Duration = Duration::from_secs(40);

/// The TLS engine, read through its unix socket (an independent reader).
fn tls_engine() -> TestEngine {
    let engine = TestEngine {
        name: "docker",
        socket: std::env::var("NIXCTR_TEST_DOCKER_TLS_SOCKET")
            .unwrap_or_else(|_| "/run/nixctr-test/docker-tls.sock".into()),
    };
    assert_eq!(engine.api_get("/_ping").trim(), "OK", "the TLS engine at {}: {SETUP_HINT}", engine.socket);
    engine
}

/// The docker CLI against the TLS engine, over TLS.
fn docker_tls() -> Cmd {
    let mut cmd = Cmd::tool("docker");
    cmd.env("DOCKER_HOST", TLS_HOST).env("DOCKER_TLS_VERIFY", "1").env("DOCKER_CERT_PATH", TLS_CLIENT);
    cmd
}

/// The lines of a PEM key file's body: none may show up in any output.
fn secret_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16).map(str::to_string).collect()
}

#[track_caller]
fn assert_no_secrets(out: &Output, keys: &[&Path]) {
    let all = format!("{}\n{}", out.stdout(), out.stderr());
    for key in keys {
        for line in secret_lines(key) {
            assert!(!all.contains(&line), "`{}` shows bytes of {}", out.shown, key.display());
        }
    }
}

/// The sandbox's ssh setup: `~/.ssh/config` trusting the setup's sshd host key (and using
/// `identity`, when given), and an `ssh` at the front of PATH that reads that config (ssh
/// finds `~` through the password database, not HOME).
fn ssh_sandbox(sandbox: &Sandbox, identity: Option<&Path>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = sandbox.path().join(".ssh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut config = format!(
        "Host 127.0.0.1\n  UserKnownHostsFile {SSH_DIR}/known_hosts\n  StrictHostKeyChecking yes\n  GlobalKnownHostsFile /dev/null\n"
    );
    if let Some(identity) = identity {
        config.push_str(&format!("  IdentityFile {}\n  IdentitiesOnly yes\n", identity.display()));
    }
    std::fs::write(dir.join("config"), config).unwrap();
    std::fs::set_permissions(dir.join("config"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrapper = sandbox.bin().join("ssh");
    std::fs::write(&wrapper, "#!/bin/sh\nexec /usr/bin/ssh -F \"$HOME/.ssh/config\" \"$@\"\n").unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// ssh processes started for this sandbox, and tunnel directories left in it.
fn ssh_leftovers(sandbox: &Sandbox) -> Vec<String> {
    let mark = sandbox.path().to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("ssh") && cmdline.contains(&mark) && !cmdline.contains("nixctr-it-ssh-probe") {
                found.push(format!("process {}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    for entry in std::fs::read_dir(sandbox.path().join("run")).unwrap().flatten() {
        found.push(format!("left in XDG_RUNTIME_DIR: {}", entry.path().display()));
    }
    found
}

#[track_caller]
fn assert_nothing_left(sandbox: &Sandbox, engine: &TestEngine, out: &Output) {
    assert_no_containers_left(engine, out);
    // The tunnel is gone once nixctr is (its Drop, or PR_SET_PDEATHSIG): give it a moment.
    let left = wait_until_empty(|| ssh_leftovers(sandbox));
    assert!(left.is_empty(), "`{}` left behind: {left:#?}", out.shown);
}

fn wait_until_empty(mut probe: impl FnMut() -> Vec<String>) -> Vec<String> {
    for _ in 0..50 {
        let found = probe();
        if found.is_empty() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    probe()
}

/// `nixctr build hello --load` in `fx` with `setup` applied; returns the loaded image name.
#[track_caller]
fn build_and_load(fx: &Fixture, engine: &TestEngine, setup: impl FnOnce(&mut Cmd), keys: &[&Path]) -> String {
    let mut cmd = fx.nixctr(None);
    cmd.args(["-v", "build", "hello", "--load"]).uses_engine().deadline(COLD_BUILD_DEADLINE);
    setup(&mut cmd);
    let out = cmd.run();
    out.success();
    assert_no_secrets(&out, keys);
    assert_nothing_left(&fx.sandbox, engine, &out);
    let image = out.stdout().trim().to_string();
    assert!(image.ends_with("hello:latest"), "loaded {image:?}");
    image
}

#[track_caller]
fn assert_runs(mut cli: Cmd, image: &str) {
    let ran = cli.args(["run", "--rm", "--network", "none", image]).run();
    ran.success();
    assert!(ran.stdout().contains("Hello, world!"), "{}", ran.stdout());
}

fn client_key() -> PathBuf {
    PathBuf::from(TLS_CLIENT).join("key.pem")
}

// ---------------------------------------------------------------------------------------------
// Working engines

#[test]
fn tls_engine_through_docker_tls_verify() {
    let engine = tls_engine();
    let fx = Fixture::new();
    let image = build_and_load(
        &fx,
        &engine,
        |cmd| {
            cmd.env("DOCKER_HOST", TLS_HOST).env("DOCKER_TLS_VERIFY", "1").env("DOCKER_CERT_PATH", TLS_CLIENT);
        },
        &[&client_key()],
    );
    assert_runs(docker_tls(), &image);
    // gc and cache ls work over TLS too.
    let over_tls = |args: &[&str]| {
        let mut cmd = fx.nixctr(None);
        cmd.args(args).env("DOCKER_HOST", TLS_HOST).env("DOCKER_TLS_VERIFY", "1").env("DOCKER_CERT_PATH", TLS_CLIENT);
        cmd.run()
    };
    let out = over_tls(&["gc", "-v"]);
    out.success().stderr_has(&format!("engine: {TLS_HOST} from DOCKER_HOST"));
    let out = over_tls(&["cache", "ls"]);
    assert!(out.success().stdout().contains("nixctr-store-"), "no store volume listed: {}", out.stdout());
}

/// A context made with the real `docker context create`, chosen by DOCKER_CONTEXT and then by
/// `docker context use` (currentContext in config.json); `-v` says which and why.
#[test]
fn tls_engine_through_docker_contexts() {
    let engine = tls_engine();
    let fx = Fixture::new();
    let config = fx.sandbox.docker_config();
    let docker = || {
        let mut cmd = Cmd::tool("docker");
        cmd.env("DOCKER_CONFIG", &config).env_remove("DOCKER_HOST").env_remove("DOCKER_CONTEXT");
        cmd
    };
    docker()
        .args(["context", "create", "remote", "--docker"])
        .arg(format!("host={TLS_HOST},ca={TLS_CLIENT}/ca.pem,cert={TLS_CLIENT}/cert.pem,key={TLS_CLIENT}/key.pem"))
        .run()
        .success();
    let stored_key = stored_key(&config);
    let client_key = client_key();
    let keys = [client_key.as_path(), stored_key.as_path()];

    let out = {
        let mut cmd = fx.nixctr(None);
        cmd.args(["-v", "cache", "ls"]).env("DOCKER_CONTEXT", "remote").uses_engine().run()
    };
    out.success().stderr_has(&format!("engine: {TLS_HOST} from Docker context \"remote\" (DOCKER_CONTEXT)"));
    let image = build_and_load(
        &fx,
        &engine,
        |cmd| {
            cmd.env("DOCKER_CONTEXT", "remote");
        },
        &keys,
    );
    let mut cli = docker();
    cli.args(["--context", "remote"]);
    assert_runs(cli, &image);

    docker().args(["context", "use", "remote"]).run().success();
    let out = fx.nixctr(None).args(["-v", "build", "hello", "--load"]).uses_engine().run();
    out.success().stderr_has(&format!(
        "engine: {TLS_HOST} from Docker context \"remote\" (currentContext in {})",
        config.join("config.json").display()
    ));
    assert_no_secrets(&out, &keys);
    assert_nothing_left(&fx.sandbox, &engine, &out);
}

fn stored_key(config: &Path) -> PathBuf {
    let tls = config.join("contexts/tls");
    let dir = std::fs::read_dir(&tls).unwrap().flatten().next().expect("docker context create stored TLS files");
    let key = dir.path().join("docker/key.pem");
    assert!(key.is_file(), "no {}", key.display());
    key
}

#[test]
fn docker_over_ssh() {
    let engines = engines();
    let docker = engines.by_name("docker").clone();
    let fx = Fixture::new();
    let identity = PathBuf::from(SSH_DIR).join("id_ed25519");
    ssh_sandbox(&fx.sandbox, Some(&identity));
    let image = build_and_load(
        &fx,
        &docker,
        |cmd| {
            cmd.args(["--engine", SSH_URL]);
        },
        &[&identity],
    );
    assert_runs(docker.cli(), &image);
    // gc and cache ls over ssh.
    fx.nixctr(None).args(["--engine", SSH_URL, "gc"]).uses_engine().run().success();
    let out = fx.nixctr(None).args(["--engine", SSH_URL, "cache", "ls"]).uses_engine().run();
    assert!(out.success().stdout().contains("nixctr-store-"), "{}", out.stdout());
    assert!(ssh_leftovers(&fx.sandbox).is_empty());
}

/// Podman's form: the socket in the URL, the key from CONTAINER_SSHKEY (passed as `-i`).
#[test]
fn podman_over_ssh() {
    let engines = engines();
    let podman = engines.by_name("podman").clone();
    let fx = Fixture::new();
    let identity = PathBuf::from(SSH_DIR).join("id_ed25519");
    ssh_sandbox(&fx.sandbox, None);
    let url = format!("{SSH_URL}{}", podman.socket);
    let image = build_and_load(
        &fx,
        &podman,
        |cmd| {
            cmd.env("CONTAINER_HOST", &url).env("CONTAINER_SSHKEY", &identity);
        },
        &[&identity],
    );
    assert_runs(podman.cli(), &image);
}

/// SIGINT during a build over ssh: the container is still removed, through the tunnel (which
/// runs in a process group of its own, so a terminal's Ctrl-C does not end it first), then
/// the tunnel goes.
#[test]
fn an_interrupted_build_over_ssh_cleans_up_through_the_tunnel() {
    let engines = engines();
    let docker = engines.by_name("docker").clone();
    let fx = Fixture::new();
    ssh_sandbox(&fx.sandbox, Some(&PathBuf::from(SSH_DIR).join("id_ed25519")));
    let mut child = fx
        .nixctr(None)
        .args(["--engine", SSH_URL, "build", "heavy", "--no-cache"])
        .uses_engine()
        .deadline(COLD_BUILD_DEADLINE)
        .spawn();
    let pid = child.pid();
    child.wait_for_line("saying nix builds busywork", WAIT, |l| {
        l.contains("building '") && l.contains("busywork-1.0.drv")
    });
    wait_until("the build container", WAIT, || (!docker.nixctr_containers(Some(pid)).is_empty()).then_some(()));
    child.signal(libc::SIGINT);
    let out = child.wait();
    out.assert_exit(130).stderr_has("interrupted");
    assert_nothing_left(&fx.sandbox, &docker, &out);
}

// ---------------------------------------------------------------------------------------------
// Bad input

/// A copy of the client TLS directory to spoil.
fn client_copy(fx: &Fixture) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = fx.path().join("certs");
    copy_dir(Path::new(TLS_CLIENT), &dir);
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

#[track_caller]
fn tls_fails(fx: &Fixture, certs: &Path, expect: &[&str]) {
    let engine = tls_engine();
    let out = fx
        .nixctr(None)
        .args(["build", "hello"])
        .env("DOCKER_HOST", TLS_HOST)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", certs)
        .deadline(FAILS_WITHIN)
        .run();
    out.assert_exit(1).stderr_has(TLS_HOST);
    for text in expect {
        out.stderr_has(text);
    }
    assert_no_secrets(&out, &[&client_key()]);
    assert_nothing_left(&fx.sandbox, &engine, &out);
}

#[test]
fn tls_missing_ca_is_named() {
    let fx = Fixture::new();
    let certs = client_copy(&fx);
    std::fs::remove_file(certs.join("ca.pem")).unwrap();
    tls_fails(&fx, &certs, &["CA certificate", &certs.join("ca.pem").display().to_string(), "does not exist"]);
}

#[test]
fn tls_wrong_ca_is_named() {
    let fx = Fixture::new();
    let certs = client_copy(&fx);
    Cmd::tool("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=not the engine's CA"])
        .arg("-keyout")
        .arg(fx.path().join("other-ca-key.pem"))
        .arg("-out")
        .arg(certs.join("ca.pem"))
        .quiet()
        .run()
        .success();
    tls_fails(&fx, &certs, &["not signed by the CA in", "fix:"]);
}

#[test]
fn tls_missing_client_certificate_is_named() {
    let fx = Fixture::new();
    let certs = client_copy(&fx);
    std::fs::remove_file(certs.join("cert.pem")).unwrap();
    tls_fails(&fx, &certs, &["client certificate", "does not exist", "fix:"]);
}

/// A client certificate signed by the engine's own CA, expired: made here with `openssl ca`.
#[test]
fn tls_expired_client_certificate_is_named() {
    let fx = Fixture::new();
    let certs = client_copy(&fx);
    let db = fx.path().join("ca-db");
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("index.txt"), "").unwrap();
    std::fs::write(db.join("serial"), "1000\n").unwrap();
    let d = db.display();
    std::fs::write(
        db.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = x\n[x]\ndatabase = {d}/index.txt\nserial = {d}/serial\nnew_certs_dir = {d}\n\
             default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
        ),
    )
    .unwrap();
    let openssl = |args: &[&str]| Cmd::tool("openssl").current_dir(&db).args(args).quiet().run().success().stdout();
    openssl(&["genrsa", "-out", "key.pem", "2048"]);
    openssl(&["req", "-new", "-key", "key.pem", "-subj", "/CN=expired", "-out", "c.csr"]);
    openssl(&[
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        &format!("{TLS_DIR}/ca.pem"),
        "-keyfile",
        &format!("{TLS_DIR}/ca-key.pem"),
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
        "-notext",
        "-in",
        "c.csr",
        "-out",
        "cert.pem",
    ]);
    std::fs::copy(db.join("cert.pem"), certs.join("cert.pem")).unwrap();
    std::fs::copy(db.join("key.pem"), certs.join("key.pem")).unwrap();
    tls_fails(&fx, &certs, &["expired on 2020-01-02", "fix:"]);
}

#[test]
fn a_tls_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let certs = client_copy(&fx);
    let key = certs.join("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    tls_fails(&fx, &certs, &[&format!("chmod 600 {}", key.display())]);
}

#[test]
fn an_unknown_context_lists_those_that_exist() {
    let fx = Fixture::new();
    Cmd::tool("docker")
        .env("DOCKER_CONFIG", fx.sandbox.docker_config())
        .args(["context", "create", "remote", "--docker"])
        .arg(format!("host={TLS_HOST}"))
        .run()
        .success();
    let out = fx.nixctr(None).args(["build", "hello"]).env("DOCKER_CONTEXT", "nope").deadline(FAILS_WITHIN).run();
    out.assert_exit(1).stderr_has("Docker context \"nope\" (from DOCKER_CONTEXT)").stderr_has("default, remote");
    let out = fx.nixctr(None).args(["--context", "nope", "cache", "ls"]).deadline(FAILS_WITHIN).run();
    out.assert_exit(1).stderr_has("\"nope\" (from --context) does not exist").stderr_has("default, remote");
}

#[track_caller]
fn ssh_fails(fx: &Fixture, setup: impl FnOnce(&mut Cmd), expect: &[&str], keys: &[&Path]) {
    let engines = engines();
    let mut cmd = fx.nixctr(None);
    cmd.args(["build", "hello"]).uses_engine().deadline(FAILS_WITHIN);
    setup(&mut cmd);
    let out = cmd.run();
    out.assert_exit(1).stderr_has("ssh://root@127.0.0.1:");
    for text in expect {
        out.stderr_has(text);
    }
    assert_no_secrets(&out, keys);
    assert_nothing_left(&fx.sandbox, engines.by_name("docker"), &out);
}

#[test]
fn a_wrong_ssh_key_is_refused_clearly() {
    let fx = Fixture::new();
    ssh_sandbox(&fx.sandbox, None);
    let key = fx.path().join("wrong_ed25519");
    Cmd::tool("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).run().success();
    ssh_fails(
        &fx,
        |cmd| {
            cmd.env("CONTAINER_HOST", SSH_URL).env("CONTAINER_SSHKEY", &key);
        },
        &["refused the key", "fix:"],
        &[&key],
    );
}

#[test]
fn an_unknown_ssh_host_key_is_refused_without_a_prompt() {
    let fx = Fixture::new();
    ssh_sandbox(&fx.sandbox, Some(&PathBuf::from(SSH_DIR).join("id_ed25519")));
    // A known_hosts that does not hold the server's key.
    let config = fx.path().join(".ssh/config");
    let text = std::fs::read_to_string(&config).unwrap().replace(&format!("{SSH_DIR}/known_hosts"), "/dev/null");
    std::fs::write(&config, text).unwrap();
    ssh_fails(
        &fx,
        |cmd| {
            cmd.args(["--engine", SSH_URL]);
        },
        &["host key", "ssh-keygen -R", "fix:"],
        &[&PathBuf::from(SSH_DIR).join("id_ed25519")],
    );
}

#[test]
fn an_ssh_host_that_does_not_answer_is_named() {
    let fx = Fixture::new();
    ssh_sandbox(&fx.sandbox, Some(&PathBuf::from(SSH_DIR).join("id_ed25519")));
    let closed = ClosedPort::new();
    let url = format!("ssh://root@127.0.0.1:{}", closed.port);
    ssh_fails(
        &fx,
        |cmd| {
            cmd.args(["--engine", &url]);
        },
        &[&url, "does not answer ssh", "fix:"],
        &[],
    );
}

#[test]
fn an_ssh_identity_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    ssh_sandbox(&fx.sandbox, None);
    let key = fx.path().join("id_copy");
    std::fs::copy(PathBuf::from(SSH_DIR).join("id_ed25519"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    ssh_fails(
        &fx,
        |cmd| {
            cmd.env("CONTAINER_HOST", SSH_URL).env("CONTAINER_SSHKEY", &key);
        },
        &[&format!("chmod 600 {}", key.display())],
        &[&key],
    );
}

// ---------------------------------------------------------------------------------------------
// Several engines

/// The fixture without its broken containers: `build --all` succeeds.
fn buildable() -> Fixture {
    let fx = Fixture::new();
    for broken in ["broken-build", "broken-eval"] {
        std::fs::remove_dir_all(fx.project().join("containers").join(broken)).unwrap();
    }
    fx
}

#[test]
fn build_all_spreads_over_two_engines_with_the_same_archives() {
    let engines = engines();
    let docker = engines.by_name("docker").clone();
    let tls = tls_engine();
    let fx = buildable();
    let one = fx.path().join("one");
    let two = fx.path().join("two");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let project = fx.project();
    fx.nixctr(Some(&docker)).current_dir(&one).arg("-C").arg(&project).args(["-q", "build", "--all"]).run().success();

    let out = fx
        .nixctr(None)
        .current_dir(&two)
        .arg("-C")
        .arg(&project)
        .args(["--engine", &docker.url(), "--engine", TLS_HOST, "build", "--all", "--json"])
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", TLS_CLIENT)
        .uses_engine()
        .deadline(COLD_BUILD_DEADLINE)
        .run();
    out.success();
    let records: Vec<serde_json::Value> = out.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let used: std::collections::BTreeSet<&str> = records.iter().map(|r| r["engine"].as_str().unwrap()).collect();
    let both = std::collections::BTreeSet::from([docker.url(), TLS_HOST.to_string()]);
    assert_eq!(
        used.into_iter().map(String::from).collect::<std::collections::BTreeSet<_>>(),
        both,
        "both engines built something"
    );
    let mut names: Vec<String> =
        std::fs::read_dir(&one).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names.len(), records.len(), "{names:?}");
    for name in names {
        let (a, b) = (std::fs::read(one.join(&name)).unwrap(), std::fs::read(two.join(&name)).unwrap());
        assert!(a == b, "{name}: the two-engine build differs from the one-engine build");
    }
    out.stderr_has(&format!("@ {TLS_HOST}"));
    assert_no_containers_left(&docker, &out);
    assert_no_containers_left(&tls, &out);
}

/// An engine lost mid-build (its ssh connection cut): its container fails naming it, the
/// other engine's container is built, and `gc` afterwards leaves nothing on either.
#[test]
fn an_engine_lost_mid_build_fails_only_its_containers() {
    let engines = engines();
    let (docker, podman) = (engines.by_name("docker").clone(), engines.by_name("podman").clone());
    let fx = buildable();
    ssh_sandbox(&fx.sandbox, Some(&PathBuf::from(SSH_DIR).join("id_ed25519")));
    let remote = format!("{SSH_URL}{}", podman.socket);
    // No build times known: round robin in the order given, heavy to the first engine.
    let mut child = fx
        .nixctr(None)
        .args(["--engine", &remote, "--engine", &docker.url(), "build", "heavy", "hello", "--no-cache"])
        .uses_engine()
        .deadline(COLD_BUILD_DEADLINE)
        .spawn();
    let pid = child.pid();
    child.wait_for_line("saying nix builds busywork", WAIT, |l| {
        l.contains("building '") && l.contains("busywork-1.0.drv")
    });
    let tunnel = wait_until("the ssh tunnel", WAIT, || {
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let cmdline = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
            let parent: u32 = stat.rsplit(") ").next()?.split(' ').nth(1)?.parse().ok()?;
            (parent == pid && cmdline.contains("ssh")).then(|| e.file_name().to_string_lossy().parse::<i32>().ok())?
        })
    });
    unsafe { libc::kill(tunnel, libc::SIGKILL) };
    let out = child.wait();
    out.assert_exit(1).stderr_has(&format!("heavy: engine {remote}")).stderr_has("1 of 2 containers failed: heavy");
    assert!(fx.project().join("hello.tar.gz").is_file(), "the other engine's container was not built");
    assert!(!fx.project().join("heavy.tar.gz").exists());
    assert_no_containers_left(&docker, &out);
    // The lost engine's container is gc's to remove, through a new connection.
    fx.nixctr(None).args(["--engine", &remote, "gc"]).uses_engine().run().success();
    assert_no_containers_left(&podman, &out);
}

/// `[platform-engines]` sends a platform's builds to its engine, whatever name the key gives
/// the platform (`linux/aarch64` is `linux/arm64`); a platform without one is built on the
/// general engine.
#[test]
fn platform_engines_build_each_platform_where_named() {
    let engines = engines();
    let docker = engines.by_name("docker").clone();
    let tls = tls_engine();
    let fx = buildable();
    let config = fx.read("nixctr.toml") + &format!("\n[platform-engines]\n\"linux/aarch64\" = \"{TLS_HOST}\"\n");
    fx.write("nixctr.toml", &config);
    let out = fx
        .nixctr(Some(&docker))
        .args(["--platform", "linux/amd64,linux/arm64", "build", "hello", "--json", "-v"])
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", TLS_CLIENT)
        .deadline(Duration::from_secs(900))
        .run();
    out.success();
    let records: Vec<serde_json::Value> = out.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let engine_of = |platform: &str| {
        let r = records.iter().find(|r| r["platform"] == platform).unwrap_or_else(|| panic!("{records:?}"));
        r["engine"].as_str().unwrap().to_string()
    };
    assert_eq!(engine_of("linux/arm64"), TLS_HOST);
    assert_eq!(engine_of("linux/amd64"), docker.url());
    out.stderr_has(&format!("engine: {TLS_HOST} from [platform-engines] \"linux/aarch64\" in nixctr.toml"));
    assert_eq!(out.stderr().matches("emulated").count(), 1, "only arm64 is emulated: {}", out.stderr());
    assert!(fx.project().join("hello-amd64.tar.gz").is_file() && fx.project().join("hello-arm64.tar.gz").is_file());
    assert_no_containers_left(&docker, &out);
    assert_no_containers_left(&tls, &out);
}

/// A `[platform-engines]` key that names no platform, or the same platform as another key,
/// is refused before any engine work, the key named.
#[test]
fn platform_engines_keys_that_name_no_platform_are_refused() {
    let fx = Fixture::new();
    let config = fx.read("nixctr.toml");
    fx.write("nixctr.toml", &format!("{config}\n[platform-engines]\n\"linux/potato\" = \"{TLS_HOST}\"\n"));
    let out = fx.nixctr(None).args(["list", "--all"]).run();
    out.assert_exit(1).stderr_has("nixctr.toml: [platform-engines] \"linux/potato\": not a platform (");
    assert!(out.stdout().is_empty(), "{}", out.stdout());
    let twice =
        format!("{config}\n[platform-engines]\n\"linux/aarch64\" = \"{TLS_HOST}\"\n\"linux/arm64\" = \"{TLS_HOST}\"\n");
    fx.write("nixctr.toml", &twice);
    fx.nixctr(None)
        .args(["list", "--all"])
        .run()
        .assert_exit(1)
        .stderr_has("[platform-engines] \"linux/aarch64\" and \"linux/arm64\" both name linux/arm64");
}
