//! `nixctr doctor`'s checks: the engine and the platforms it runs (each tried with a throwaway
//! `uname -m` in the nix image, so emulation is checked, not assumed), the nix image, the
//! project, the registry and the binary cache. Each check is a finding with its fix when it
//! fails; nothing here prints, and a failed check never stops the others.

use std::path::Path;

use serde::Serialize;

use crate::engine::{self, ContainerGuard, ContainerSpec, Engine, OutputMode, PullPolicy};
use crate::engines::EngineChoice;
use crate::nix::{Builders, NixOptions};
use crate::platform::Platform;
use crate::progress::Progress;
use crate::registry::RegistryConfig;

/// The settings file at the project root (`settings` reads it; here only its presence is shown).
const CONFIG_FILE: &str = "nixctr.toml";

/// What the checks look at, resolved by the caller as for any other command.
pub(crate) struct Options<'a> {
    pub(crate) engines: &'a EngineChoice,
    pub(crate) nix: &'a NixOptions,
    /// The platforms to build for; empty: the engine's own.
    pub(crate) platforms: &'a [Platform],
    pub(crate) root: Option<&'a Path>,
    /// The registry (`host[:port]`) and how to reach it, when one is configured.
    pub(crate) registry: Option<(&'a str, &'a RegistryConfig)>,
}

/// Every section, in the order shown.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// No check failed.
    pub(crate) ok: bool,
    pub(crate) sections: Vec<Section>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Section {
    pub(crate) name: &'static str,
    pub(crate) checks: Vec<Check>,
    /// Why the section has no checks (no engine to ask, nothing configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) skipped: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) ok: bool,
    /// What was found, or what is wrong: one line.
    pub(crate) detail: String,
    /// What to do about it (failed checks only).
    pub(crate) fix: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check { name: name.into(), ok: true, detail: one_line(&detail.into()), fix: None }
    }

    /// A failed check: `error`'s text, its trailing parenthesis taken as the fix when there
    /// is one, else `fix`.
    fn problem(name: impl Into<String>, error: &str, fix: &str) -> Check {
        let (detail, own_fix) = split_fix(&one_line(error));
        Check { name: name.into(), ok: false, detail, fix: Some(own_fix.unwrap_or_else(|| fix.to_string())) }
    }

    /// A failed check whose fix is known better here than in the error's text.
    fn problem_with(name: impl Into<String>, detail: &str, fix: &str) -> Check {
        Check { name: name.into(), ok: false, detail: one_line(detail), fix: Some(fix.to_string()) }
    }
}

impl Section {
    fn new(name: &'static str) -> Section {
        Section { name, checks: Vec::new(), skipped: None }
    }

    fn skipped(name: &'static str, why: impl Into<String>) -> Section {
        Section { name, checks: Vec::new(), skipped: Some(why.into()) }
    }
}

impl Report {
    /// The failed checks, with their section's name.
    pub(crate) fn problems(&self) -> impl Iterator<Item = (&'static str, &Check)> {
        self.sections.iter().flat_map(|s| s.checks.iter().filter(|c| !c.ok).map(move |c| (s.name, c)))
    }
}

const EMULATION_FIX: &str = "on Linux install qemu-user-static with binfmt (the fix-binary flag); on Docker Desktop \
     enable Rosetta or QEMU emulation; or build that platform on an engine of its own ([platform-engines] in \
     nixctr.toml)";
const PLATFORM_FIX: &str =
    "pick a platform it has with --platform (or `platforms` in nixctr.toml), or name another image with --nix-image";

/// Runs every check.
pub(crate) async fn examine(options: &Options<'_>, progress: &Progress) -> Report {
    let (mut engine_section, engine) = engine_checks(options, progress).await;
    let image_section = match &engine {
        Some((engine, _)) => image_checks(engine, options).await,
        None => Image { section: Section::skipped("nix image", "no engine to ask"), has: None },
    };
    if let Some((engine, native)) = &engine {
        let wanted = if options.platforms.is_empty() { vec![native.clone()] } else { options.platforms.to_vec() };
        // The engine's own platform last: a run for another platform may leave the image's tag
        // naming that platform's image, and the native run puts it back for the builds to come.
        let mut order: Vec<&Platform> = wanted.iter().collect();
        order.sort_by_key(|p| engine::same_platform(p, native));
        let mut runs = Vec::new();
        for platform in order {
            // A platform the image lacks is the image section's problem: no container to run.
            if image_section.has.as_ref().is_some_and(|has| !has.iter().any(|p| engine::same_platform(p, platform))) {
                continue;
            }
            runs.push((platform, run_check(engine, native, platform, options, progress).await));
        }
        runs.sort_by_key(|(platform, _)| wanted.iter().position(|w| w == *platform));
        engine_section.checks.extend(runs.into_iter().map(|(_, check)| check));
    }
    let sections = vec![
        engine_section,
        image_section.section,
        project_checks(options.root),
        registry_checks(options, progress).await,
        cache_checks(options.nix),
        builder_checks(engine.as_ref(), options, progress).await,
    ];
    let ok = sections.iter().all(|s| s.checks.iter().all(|c| c.ok));
    Report { ok, sections }
}

/// The engine: which, why, its versions; every other engine named. Returns the first engine
/// and its own platform for the checks that need one.
async fn engine_checks(options: &Options<'_>, progress: &Progress) -> (Section, Option<(Engine, Platform)>) {
    let mut section = Section::new("engine");
    let choice = options.engines;
    let why = match &choice.first {
        Some(address) => format!("from {}", address.why),
        None => "the first of the usual sockets that answered (none named)".to_string(),
    };
    let first = match Engine::connect(choice.first.as_ref(), progress).await {
        Ok(engine) => match describe(&engine, &why).await {
            Ok((detail, native)) => {
                section.checks.push(Check::ok("engine", detail));
                Some((engine, native))
            }
            Err(e) => {
                section.checks.push(Check::problem("engine", &format!("{e:#}"), "check the engine's health"));
                None
            }
        },
        Err(e) => {
            section.checks.push(engine_problem("engine", &format!("{e:#}")));
            None
        }
    };
    for address in choice.all.iter().skip(1) {
        let name = format!("engine {}", address.url);
        match Engine::connect(Some(address), progress).await {
            Ok(engine) => match describe(&engine, &format!("from {}", address.why)).await {
                Ok((detail, _)) => section.checks.push(Check::ok(name, detail)),
                Err(e) => section.checks.push(Check::problem(name, &format!("{e:#}"), "check the engine's health")),
            },
            Err(e) => section.checks.push(engine_problem(&name, &format!("{e:#}"))),
        }
    }
    (section, first)
}

/// `Docker 26.1.5 (API 1.45) at URL, from WHY; runs linux/amd64 natively`, and that platform.
async fn describe(engine: &Engine, why: &str) -> anyhow::Result<(String, Platform)> {
    let (version, api) = engine.versions().await?;
    let native = engine.native_platform().await?;
    let detail = format!(
        "{} {version} (API {api}) at {}, {why}; its own platform: {native}",
        engine.flavor_name(),
        engine.address()
    );
    Ok((detail, native))
}

/// An engine that does not answer: the engine module's hint is the fix.
fn engine_problem(name: &str, error: &str) -> Check {
    match error.split_once(engine::START_HINT) {
        Some((detail, _)) => Check::problem_with(name, detail, engine::START_HINT),
        None => Check::problem(name, error, "check the address, and that the engine runs"),
    }
}

/// One platform: its image made present (as a build would), then `uname -m` in a throwaway
/// container of it, on the platform's own engine when `[platform-engines]` names one.
async fn run_check(
    general: &Engine,
    general_native: &Platform,
    platform: &Platform,
    options: &Options<'_>,
    progress: &Progress,
) -> Check {
    let name = platform.to_string();
    let own;
    let (engine, native) = match options.engines.by_platform.get(&name) {
        None => (general, general_native.clone()),
        Some(address) => {
            let connected = Engine::connect(Some(address), progress).await;
            let native = match &connected {
                Ok(engine) => engine.native_platform().await,
                Err(_) => Ok(platform.clone()),
            };
            match (connected, native) {
                (Ok(engine), Ok(native)) => {
                    own = engine;
                    (&own, native)
                }
                (Err(e), _) | (_, Err(e)) => return engine_problem(&name, &format!("{e:#}")),
            }
        }
    };
    let image = &options.nix.image;
    let id = match engine.ensure_image(image, options.nix.pull, platform, progress).await {
        Ok(id) => id,
        Err(e) => return Check::problem(&name, &format!("{e:#}"), "check that the engine can pull the nix image"),
    };
    let machine = match uname(engine, &id, progress).await {
        Ok(machine) => machine,
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("exec format error") {
                let detail = format!(
                    "the engine cannot run {platform} containers (it is {native}): no emulation for {platform} \
                     (binfmt): {text}"
                );
                return Check::problem_with(&name, &detail, EMULATION_FIX);
            }
            return Check::problem(&name, &text, "run `nixctr -v doctor` to see the engine calls");
        }
    };
    match read_uname(platform, &machine) {
        Ok(()) if engine::same_platform(platform, &native) => {
            Check::ok(name, format!("native (uname -m in the nix image: {machine}, on {})", engine.address()))
        }
        Ok(()) => Check::ok(name, format!("emulated (uname -m in the nix image: {machine}, on {})", engine.address())),
        Err(why) => Check::problem_with(
            &name,
            &format!("the nix image {image} for {platform} {why}"),
            "its image for that platform holds another platform's programs: name another image with --nix-image",
        ),
    }
}

/// `uname -m` in a container of image `id`, removed afterwards.
async fn uname(engine: &Engine, id: &str, progress: &Progress) -> anyhow::Result<String> {
    let spec = ContainerSpec {
        image: id.to_string(),
        role: "doctor",
        volumes: Vec::new(),
        env: Vec::new(),
        network: Some("none".to_string()),
    };
    let guard = ContainerGuard::start(engine, spec, progress).await?;
    let cmd = ["uname".to_string(), "-m".to_string()];
    let out = guard.exec(&cmd, &[], None, OutputMode::Captured).await;
    let removed = guard.remove().await;
    let out = out?;
    removed?;
    if out.exit_code != 0 {
        anyhow::bail!("uname -m exited with {}: {}", out.exit_code, out.stderr_tail.join(" "));
    }
    Ok(out.stdout.trim().to_string())
}

/// Whether `uname -m` as printed in a container of `platform` names that platform's
/// architecture (`x86_64` for amd64, `aarch64` for arm64, `armv7l` for arm/v7). The error says
/// what it named instead.
pub(crate) fn read_uname(platform: &Platform, machine: &str) -> Result<(), String> {
    let machine = machine.trim();
    if machine.is_empty() {
        return Err("printed no machine name for `uname -m`".to_string());
    }
    // Arm kernels say armv6l, armv7l, or armv8l for 32-bit programs on a 64-bit CPU.
    let ran = if machine.starts_with("armv") && machine.ends_with('l') && machine != "armv8b" {
        Platform::new(&platform.os, "arm", None)
    } else {
        Platform::new(&platform.os, machine, None)
    };
    if ran.architecture == platform.architecture {
        Ok(())
    } else {
        Err(format!("runs {} programs (uname -m: {machine}), not {}", ran.architecture, platform.architecture))
    }
}

/// The image section, and the platforms the image has when the engine could list them.
struct Image {
    section: Section,
    has: Option<Vec<Platform>>,
}

/// The nix image: in the engine or not, and the platforms it has.
async fn image_checks(engine: &Engine, options: &Options<'_>) -> Image {
    let mut section = Section::new("nix image");
    let image = &options.nix.image;
    let local = engine.local_image(image).await;
    match &local {
        Ok(Some((id, platform))) => {
            let short: String = id.trim_start_matches("sha256:").chars().take(12).collect();
            section.checks.push(Check::ok("image", format!("{image}: in the engine ({platform}, {short})")));
        }
        Ok(None) if options.nix.pull == PullPolicy::Never => section.checks.push(Check::problem_with(
            "image",
            &format!("{image} is not in the engine, and --pull never forbids pulling it"),
            "pull it, or drop --pull never",
        )),
        Ok(None) => {
            section.checks.push(Check::ok("image", format!("{image}: not in the engine yet; pulled when used")))
        }
        Err(e) => section.checks.push(Check::problem("image", &format!("{e:#}"), "check the engine's health")),
    }
    let has = engine.platforms_of(image).await;
    match &has {
        Some(has) => {
            let listed: Vec<String> = has.iter().map(Platform::to_string).collect();
            let missing: Vec<String> = options
                .platforms
                .iter()
                .filter(|p| !has.iter().any(|h| engine::same_platform(h, p)))
                .map(Platform::to_string)
                .collect();
            if missing.is_empty() {
                section.checks.push(Check::ok("platforms", format!("has {}", listed.join(", "))));
            } else {
                let detail = format!("{image} has no {} image; it has {}", missing.join(" or "), listed.join(", "));
                section.checks.push(Check::problem_with("platforms", &detail, PLATFORM_FIX));
            }
        }
        // A single-platform image, or a registry the engine cannot ask: the runs tell.
        None => section.checks.push(Check::ok(
            "platforms",
            match &local {
                Ok(Some((_, platform))) => format!("{platform} (the engine lists no others)"),
                _ => "the engine cannot list them (the platform runs below tell)".to_string(),
            },
        )),
    }
    Image { section, has }
}

/// The project: its root and its containers.
fn project_checks(root: Option<&Path>) -> Section {
    let mut section = Section::new("project");
    let Some(root) = root else {
        section.checks.push(Check::problem_with(
            "root",
            &format!("no project found: no {CONFIG_FILE} or .git in the working directory or its parents"),
            "run nixctr in the project root, or pass -C DIR",
        ));
        return section;
    };
    let config = if root.join(CONFIG_FILE).is_file() { CONFIG_FILE } else { "no nixctr.toml: the defaults" };
    section.checks.push(Check::ok("root", format!("{} ({config})", root.display())));
    let names = crate::project::container_names(root);
    if names.is_empty() {
        section.checks.push(Check::problem_with(
            "containers",
            &format!("no containers/*/default.nix in {}", root.display()),
            "add containers/NAME/default.nix, or pass -C DIR for the project root",
        ));
    } else {
        section.checks.push(Check::ok("containers", format!("{}: {}", names.len(), names.join(", "))));
    }
    section
}

/// The registry: credentials found, reached, `/v2/`, the login.
async fn registry_checks(options: &Options<'_>, progress: &Progress) -> Section {
    let Some((registry, config)) = options.registry else {
        return Section::skipped(
            "registry",
            "none configured (--registry, NIXCTR_REGISTRY or `registry` in nixctr.toml)",
        );
    };
    let mut section = Section::new("registry");
    let probe = config.probe(registry, progress).await;
    section.checks.push(match &probe.credentials {
        Ok(Some(found)) => Check::ok("credentials", found.clone()),
        Ok(None) => Check::ok("credentials", format!("none found for {registry}: anonymous")),
        Err(e) => Check::problem("credentials", &format!("{e:#}"), "fix or remove that credential source"),
    });
    let fix_reach = "check the address, and that the registry runs";
    let steps = [("reachable", probe.reach, fix_reach), ("/v2/", probe.api, "check that this address is a registry")];
    for (name, step, fix) in steps {
        match step {
            Some(Ok(detail)) => section.checks.push(Check::ok(name, detail)),
            Some(Err(e)) => section.checks.push(Check::problem(name, &format!("{e:#}"), fix)),
            None => {}
        }
    }
    match probe.login {
        Some(Ok(detail)) => section.checks.push(Check::ok("login", detail)),
        Some(Err(e)) => section.checks.push(Check::problem(
            "login",
            &format!("{e:#}"),
            "log in with `podman login` or `docker login`, or set NIXCTR_REGISTRY_USERNAME and NIXCTR_REGISTRY_PASSWORD",
        )),
        None => {}
    }
    section
}

/// The binary caches: each URL, key and secret file checked as a build would.
fn cache_checks(nix: &NixOptions) -> Section {
    let findings = nix.cache.findings();
    if findings.is_empty() {
        return Section::skipped(
            "binary cache",
            "none configured (--substituter, --cache-to, or substituters and cache-to in nixctr.toml)",
        );
    }
    let mut section = Section::new("binary cache");
    for finding in findings {
        section.checks.push(match finding.result {
            Ok(detail) => Check::ok(finding.what, detail),
            Err(e) => Check::problem(finding.what, &format!("{e:#}"), "see the nixctr README on binary caches"),
        });
    }
    section
}

/// The remote builders, each reached from a throwaway nix container as a build reaches it:
/// the daemon answers through ssh, and each system its spec lists builds there.
async fn builder_checks(engine: Option<&(Engine, Platform)>, options: &Options<'_>, progress: &Progress) -> Section {
    const FIX: &str = "see the nixctr README on remote builders";
    let builders = match Builders::new(&options.nix.builders) {
        Ok(Some(builders)) => builders,
        Ok(None) => return Section::skipped("builders", "none configured (--builder, or builders in nixctr.toml)"),
        Err(e) => {
            let mut section = Section::new("builders");
            section.checks.push(Check::problem("settings", &format!("{e:#}"), FIX));
            return section;
        }
    };
    let Some((engine, native)) = engine else {
        return Section::skipped("builders", "no engine to reach them from");
    };
    let mut section = Section::new("builders");
    let probes = async {
        let image = engine.ensure_image(&options.nix.image, options.nix.pull, native, progress).await?;
        let network = options.nix.cache.network.map(|n| n.mode().to_string());
        let spec = ContainerSpec { image, role: "doctor", volumes: Vec::new(), env: Vec::new(), network };
        let guard = ContainerGuard::start(engine, spec, progress).await?;
        let probes = builders.probe(&guard).await;
        let removed = guard.remove().await;
        let probes = probes?;
        removed?;
        anyhow::Ok(probes)
    };
    match probes.await {
        Ok(probes) => section.checks.extend(probes.into_iter().map(|p| match p.result {
            Ok(detail) => Check::ok(p.name, detail),
            Err((detail, fix)) => Check::problem_with(p.name, &detail, &fix),
        })),
        Err(e) => section.checks.push(Check::problem("builders", &format!("{e:#}"), "check the engine's health")),
    }
    section
}

/// Text on one line: line breaks and the indentation after them become single spaces.
fn one_line(text: &str) -> String {
    text.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// `what failed (what to do)` -> (`what failed`, `what to do`): nixctr's errors carry their
/// fix in a closing parenthesis. Text without one is all detail.
fn split_fix(text: &str) -> (String, Option<String>) {
    let text = text.trim();
    if !text.ends_with(')') {
        return (text.to_string(), None);
    }
    let mut depth = 0usize;
    for (at, c) in text.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    let (detail, fix) = (text[..at].trim_end(), &text[at + 1..text.len() - 1]);
                    // `… (HTTP 404)` and `… (from --engine)` are details, not fixes: a fix
                    // has a few words.
                    if detail.is_empty() || fix.split_whitespace().count() < 4 {
                        return (text.to_string(), None);
                    }
                    return (detail.trim_end_matches([':', ',']).to_string(), Some(fix.to_string()));
                }
            }
            _ => {}
        }
    }
    (text.to_string(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(text: &str) -> Platform {
        Platform::parse(text).unwrap()
    }

    #[test]
    fn uname_names_the_platform_it_ran() {
        for (p, machine) in [
            ("linux/amd64", "x86_64\n"),
            ("linux/arm64", "aarch64"),
            ("linux/arm/v7", "armv7l"),
            ("linux/arm/v7", "armv8l"),
            ("linux/arm/v6", "armv6l"),
            ("linux/386", "i686"),
            ("linux/riscv64", "riscv64"),
            ("linux/s390x", "s390x"),
            ("linux/ppc64le", "ppc64le"),
        ] {
            assert_eq!(read_uname(&platform(p), machine), Ok(()), "{p} {machine}");
        }
    }

    #[test]
    fn a_uname_of_another_platform_is_a_mismatch_that_says_which() {
        // An arm64 image whose programs are amd64 runs natively on an amd64 engine: the
        // emulation was never tried.
        let err = read_uname(&platform("linux/arm64"), "x86_64").unwrap_err();
        assert_eq!(err, "runs amd64 programs (uname -m: x86_64), not arm64");
        let err = read_uname(&platform("linux/amd64"), "aarch64").unwrap_err();
        assert!(err.contains("runs arm64 programs"), "{err}");
        assert!(read_uname(&platform("linux/arm/v7"), "aarch64").is_err());
        assert_eq!(read_uname(&platform("linux/amd64"), " \n").unwrap_err(), "printed no machine name for `uname -m`");
    }

    #[test]
    fn a_trailing_parenthesis_is_the_fix() {
        assert_eq!(
            split_fix("cannot reach registry r:1: connection refused (is it running, and is the address right?)"),
            (
                "cannot reach registry r:1: connection refused".to_string(),
                Some("is it running, and is the address right?".to_string())
            )
        );
        // Nested parentheses stay in the fix; short ones are details.
        let (detail, fix) = split_fix("x failed (pass --ca-cert FILE (a PEM file) or --insecure)");
        assert_eq!(
            (detail.as_str(), fix.as_deref()),
            ("x failed", Some("pass --ca-cert FILE (a PEM file) or --insecure"))
        );
        assert_eq!(split_fix("no such image (HTTP 404)"), ("no such image (HTTP 404)".to_string(), None));
        assert_eq!(split_fix("(only a parenthesis here)"), ("(only a parenthesis here)".to_string(), None));
        assert_eq!(split_fix("plain text"), ("plain text".to_string(), None));
    }

    #[test]
    fn problems_are_one_line_and_carry_a_fix() {
        let check = Check::problem("engine", "cannot reach\n    the engine", "start it");
        assert_eq!(
            (check.detail.as_str(), check.fix.as_deref(), check.ok),
            ("cannot reach the engine", Some("start it"), false)
        );
        let report = Report {
            ok: false,
            sections: vec![
                Section { name: "engine", checks: vec![check, Check::ok("linux/amd64", "native")], skipped: None },
                Section::skipped("registry", "none configured"),
            ],
        };
        let problems: Vec<_> = report.problems().map(|(s, c)| (s, c.name.as_str())).collect();
        assert_eq!(problems, [("engine", "engine")]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["sections"][0]["checks"][0]["fix"], "start it");
        assert_eq!(json["sections"][0]["checks"][1]["fix"], serde_json::Value::Null);
        assert_eq!(json["sections"][1]["skipped"], "none configured");
    }

    #[test]
    fn an_engine_that_is_not_there_gets_the_start_hint_as_its_fix() {
        let error = format!(
            "cannot reach the engine at unix:///nope.sock (from --engine): no such file\n  {}",
            engine::START_HINT
        );
        let check = engine_problem("engine", &error);
        assert_eq!(check.detail, "cannot reach the engine at unix:///nope.sock (from --engine): no such file");
        assert_eq!(check.fix.as_deref(), Some(engine::START_HINT));
    }
}
