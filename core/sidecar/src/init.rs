//! `pymesh-proxy init`: installs the transparent-proxy redirect rules in the current network
//! namespace, the way a pod's init container does before the application starts.
//!
//! Outbound TCP goes to the proxy's outbound port, except connections by the proxy's own user
//! (and group, if given) — so the proxy never loops into itself —, loopback, and the configured
//! skip ports and CIDRs. Inbound TCP goes to the proxy's inbound port, except the admin port and
//! the configured skip ports. Two backends drive the system's own tools: nftables (`nft`, one
//! table `inet pymesh` that is ours alone) and iptables-legacy (`iptables-legacy-restore` and
//! `ip6tables-legacy-restore`, two chains of ours in the `nat` table and one jump to each).
//!
//! Every run reads what is installed first: the same rules again change nothing, other rules are
//! replaced in one transaction, `--uninstall` removes exactly what an install added, and
//! `--dry-run` prints the rules without touching the kernel. Input is validated before any tool
//! runs, so bad input changes nothing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use clap::builder::BoolishValueParser;
use clap::{Args, ValueEnum};
use ipnet::IpNet;

/// The nftables table that holds every rule of ours (nothing else lives in it).
const NFT_TABLE: &str = "pymesh";
/// The marker in that table's comment, followed by a fingerprint of the rules.
const NFT_MARKER: &str = "pymesh-proxy init sha256:";
/// The iptables chains of ours, in the `nat` table.
const CHAIN_OUTPUT: &str = "PYMESH_OUTPUT";
const CHAIN_PREROUTING: &str = "PYMESH_PREROUTING";

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    /// The netfilter front end that installs the rules.
    #[arg(long, env = "PYMESH_INIT_BACKEND", value_enum, default_value_t = Backend::Nftables)]
    pub backend: Backend,
    /// Where redirected outbound connections go: the proxy's outbound listener.
    #[arg(long, env = "PYMESH_OUTBOUND_PORT", default_value_t = 4140, value_parser = port)]
    pub outbound_port: u16,
    /// Where redirected inbound connections go: the proxy's inbound listener.
    #[arg(long, env = "PYMESH_INBOUND_PORT", default_value_t = 4143, value_parser = port)]
    pub inbound_port: u16,
    /// The proxy's admin port: inbound connections to it are not redirected.
    #[arg(long, env = "PYMESH_ADMIN_PORT", default_value_t = 4191, value_parser = port)]
    pub admin_port: u16,
    /// The user the proxy runs as: its own connections are not redirected.
    #[arg(long, env = "PYMESH_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,
    /// A group whose connections are not redirected either (none by default).
    #[arg(long, env = "PYMESH_PROXY_GID")]
    pub proxy_gid: Option<u32>,
    /// Outbound destination ports not redirected: `22,443,8000-8100` (repeatable).
    #[arg(long, env = "PYMESH_SKIP_OUTBOUND_PORTS", value_parser = port_list)]
    pub skip_outbound_ports: Vec<PortList>,
    /// Inbound ports not redirected, besides the admin port: `22,9100` (repeatable).
    #[arg(long, env = "PYMESH_SKIP_INBOUND_PORTS", value_parser = port_list)]
    pub skip_inbound_ports: Vec<PortList>,
    /// Outbound destinations not redirected: `10.0.0.0/8,fd00::/8,192.0.2.7` (repeatable).
    #[arg(long, env = "PYMESH_SKIP_OUTBOUND_CIDRS", value_parser = cidr_list)]
    pub skip_outbound_cidrs: Vec<CidrList>,
    /// Print the rules (the input the backend's tool would get) and change nothing.
    #[arg(long, env = "PYMESH_INIT_DRY_RUN", value_parser = BoolishValueParser::new())]
    pub dry_run: bool,
    /// Remove the rules an earlier run installed, and nothing else.
    #[arg(long, env = "PYMESH_INIT_UNINSTALL", value_parser = BoolishValueParser::new())]
    pub uninstall: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `nft`: one table, `inet pymesh`.
    Nftables,
    /// `iptables-legacy-restore` / `ip6tables-legacy-restore`: chains in the `nat` table.
    IptablesLegacy,
}

/// An inclusive range of ports; a single port is `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    first: u16,
    last: u16,
}

/// One flag value's ports (a comma-separated list; empty is allowed, for an empty env var).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList(Vec<PortRange>);

/// One flag value's networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrList(Vec<IpNet>);

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Invalid(String),
    #[error("{tool} is not installed ({source}); install Debian's {package} package")]
    Missing {
        tool: &'static str,
        package: &'static str,
        source: std::io::Error,
    },
    #[error("running {tool}: {source}")]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "table inet {NFT_TABLE} exists but was not made by pymesh-proxy init; leaving it alone"
    )]
    ForeignTable,
}

fn port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

fn port_list(s: &str) -> Result<PortList, String> {
    let mut ranges = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let range = match item.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!(
                        "{item:?}: a range goes from low to high, like 8000-8100"
                    ));
                }
                PortRange { first, last }
            }
            None => {
                let p = port(item)?;
                PortRange { first: p, last: p }
            }
        };
        ranges.push(range);
    }
    Ok(PortList(ranges))
}

fn cidr_list(s: &str) -> Result<CidrList, String> {
    let mut nets = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let net = match item.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match item.parse::<IpAddr>() {
                Ok(addr) => IpNet::from(addr),
                Err(_) => {
                    return Err(format!(
                        "{item:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8) or an address"
                    ))
                }
            },
        };
        nets.push(net);
    }
    Ok(CidrList(nets))
}

/// Sorted, with overlapping and adjacent ranges merged (nftables refuses overlapping set elements).
fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last)
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// The validated rule set, independent of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    outbound_port: u16,
    inbound_port: u16,
    proxy_uid: u32,
    proxy_gid: Option<u32>,
    skip_outbound_ports: Vec<PortRange>,
    /// Includes the admin port.
    skip_inbound_ports: Vec<PortRange>,
    skip_outbound_v4: Vec<IpNet>,
    skip_outbound_v6: Vec<IpNet>,
}

impl Rules {
    pub fn from_args(args: &InitArgs) -> Result<Self, InitError> {
        if args.inbound_port == args.outbound_port {
            return Err(InitError::Invalid(format!(
                "--inbound-port and --outbound-port are both {}; they must differ",
                args.inbound_port
            )));
        }
        if args.admin_port == args.inbound_port {
            return Err(InitError::Invalid(format!(
                "--admin-port and --inbound-port are both {}; they must differ",
                args.admin_port
            )));
        }
        let flat = |lists: &[PortList]| -> Vec<PortRange> {
            lists.iter().flat_map(|l| l.0.iter().copied()).collect()
        };
        let mut inbound = flat(&args.skip_inbound_ports);
        inbound.push(PortRange {
            first: args.admin_port,
            last: args.admin_port,
        });
        let mut nets: Vec<IpNet> = args
            .skip_outbound_cidrs
            .iter()
            .flat_map(|l| l.0.iter().copied())
            .collect();
        nets.sort();
        nets.dedup();
        let (v4, v6) = nets.into_iter().partition(|n| matches!(n, IpNet::V4(_)));
        Ok(Rules {
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
            proxy_uid: args.proxy_uid,
            proxy_gid: args.proxy_gid,
            skip_outbound_ports: merge(flat(&args.skip_outbound_ports)),
            skip_inbound_ports: merge(inbound),
            skip_outbound_v4: v4,
            skip_outbound_v6: v6,
        })
    }

    /// The table as `nft -f` reads it; its comment fingerprints the rules, so a later run can
    /// tell, without touching anything, that they are already installed.
    pub fn nft_table(&self) -> String {
        let body = self.nft_chains();
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let fingerprint: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("table inet {NFT_TABLE} {{\n\tcomment \"{NFT_MARKER}{fingerprint}\"\n{body}}}\n")
    }

    fn nft_chains(&self) -> String {
        let set = |ranges: &[PortRange]| -> String {
            let items: Vec<String> = ranges
                .iter()
                .map(|r| {
                    if r.first == r.last {
                        r.first.to_string()
                    } else {
                        format!("{}-{}", r.first, r.last)
                    }
                })
                .collect();
            format!("{{ {} }}", items.join(", "))
        };
        let mut out = String::new();
        let w = &mut out;
        // Writing to a String cannot fail.
        let _ = writeln!(w, "\tchain output {{");
        let _ = writeln!(w, "\t\ttype nat hook output priority -100; policy accept;");
        let _ = writeln!(w, "\t\tmeta skuid {} return", self.proxy_uid);
        if let Some(gid) = self.proxy_gid {
            let _ = writeln!(w, "\t\tmeta skgid {gid} return");
        }
        let _ = writeln!(w, "\t\toifname \"lo\" return");
        for net in &self.skip_outbound_v4 {
            let _ = writeln!(w, "\t\tip daddr {net} return");
        }
        for net in &self.skip_outbound_v6 {
            let _ = writeln!(w, "\t\tip6 daddr {net} return");
        }
        if !self.skip_outbound_ports.is_empty() {
            let _ = writeln!(w, "\t\ttcp dport {} return", set(&self.skip_outbound_ports));
        }
        let _ = writeln!(
            w,
            "\t\tmeta l4proto tcp redirect to :{}",
            self.outbound_port
        );
        let _ = writeln!(w, "\t}}\n");
        let _ = writeln!(w, "\tchain prerouting {{");
        let _ = writeln!(
            w,
            "\t\ttype nat hook prerouting priority -100; policy accept;"
        );
        let _ = writeln!(w, "\t\tiifname \"lo\" return");
        let _ = writeln!(w, "\t\ttcp dport {} return", set(&self.skip_inbound_ports));
        let _ = writeln!(w, "\t\tmeta l4proto tcp redirect to :{}", self.inbound_port);
        let _ = writeln!(w, "\t}}");
        out
    }

    /// The rules of our two chains, exactly as `iptables-legacy-save` prints them back.
    pub fn iptables_rules(&self, family: Family) -> Vec<String> {
        let dport = |r: &PortRange| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}:{}", r.first, r.last)
            }
        };
        let out = |rule: String| format!("-A {CHAIN_OUTPUT} {rule}");
        let pre = |rule: String| format!("-A {CHAIN_PREROUTING} {rule}");
        let mut rules = vec![out(format!(
            "-m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ))];
        if let Some(gid) = self.proxy_gid {
            rules.push(out(format!("-m owner --gid-owner {gid} -j RETURN")));
        }
        rules.push(out("-o lo -j RETURN".into()));
        let nets = match family {
            Family::V4 => &self.skip_outbound_v4,
            Family::V6 => &self.skip_outbound_v6,
        };
        for net in nets {
            rules.push(out(format!("-d {net} -j RETURN")));
        }
        for r in &self.skip_outbound_ports {
            rules.push(out(format!("-p tcp -m tcp --dport {} -j RETURN", dport(r))));
        }
        rules.push(out(format!(
            "-p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        )));
        rules.push(pre("-i lo -j RETURN".into()));
        for r in &self.skip_inbound_ports {
            rules.push(pre(format!("-p tcp -m tcp --dport {} -j RETURN", dport(r))));
        }
        rules.push(pre(format!(
            "-p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        )));
        rules
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-legacy-restore",
            Family::V6 => "ip6tables-legacy-restore",
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-legacy-save",
            Family::V6 => "ip6tables-legacy-save",
        }
    }
    /// The tables this namespace has instantiated: reading it loads nothing, unlike `-t nat`.
    fn table_names(self) -> &'static str {
        match self {
            Family::V4 => "/proc/net/ip_tables_names",
            Family::V6 => "/proc/net/ip6_tables_names",
        }
    }
}

/// The jumps from the built-in chains into ours.
fn jumps() -> [String; 2] {
    [
        format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}"),
        format!("-A PREROUTING -p tcp -j {CHAIN_PREROUTING}"),
    ]
}

/// What `iptables-legacy-restore --noflush` gets to install `rules` from scratch (jumps included).
fn iptables_install_input(rules: &[String], with_jumps: &[String]) -> String {
    let mut input = format!("*nat\n:{CHAIN_OUTPUT} - [0:0]\n:{CHAIN_PREROUTING} - [0:0]\n");
    for line in rules.iter().chain(with_jumps) {
        input.push_str(line);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    input
}

/// Entry point of the subcommand: one line on stdout saying what happened.
pub fn main(args: InitArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pymesh-proxy init: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &InitArgs) -> anyhow::Result<()> {
    let rules = Rules::from_args(args)?;
    let verb = if args.uninstall {
        "uninstall"
    } else {
        "install"
    };
    if args.dry_run {
        print!("{}", dry_run(&rules, args.backend, args.uninstall));
        return Ok(());
    }
    let changed = match (args.backend, args.uninstall) {
        (Backend::Nftables, false) => nft_install(&rules)?,
        (Backend::Nftables, true) => nft_uninstall()?,
        (Backend::IptablesLegacy, uninstall) => {
            let mut changed = false;
            for family in [Family::V4, Family::V6] {
                if family == Family::V6 && !Path::new("/proc/sys/net/ipv6").exists() {
                    continue;
                }
                changed |= if uninstall {
                    iptables_uninstall(family)?
                } else {
                    iptables_install(&rules, family)?
                };
            }
            changed
        }
    };
    let backend = args
        .backend
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    let outcome = match (changed, args.uninstall) {
        (false, _) => "unchanged",
        (true, false) => "installed",
        (true, true) => "removed",
    };
    println!("{verb} {backend}: {outcome}");
    Ok(())
}

/// The rules as the backend's tool would read them, for `--dry-run`.
fn dry_run(rules: &Rules, backend: Backend, uninstall: bool) -> String {
    match (backend, uninstall) {
        (Backend::Nftables, false) => format!("# nft -f -\n{}", rules.nft_table()),
        (Backend::Nftables, true) => format!("# nft -f -\ndelete table inet {NFT_TABLE}\n"),
        (Backend::IptablesLegacy, false) => [Family::V4, Family::V6]
            .iter()
            .map(|&f| {
                format!(
                    "# {} --noflush\n{}",
                    f.restore(),
                    iptables_install_input(&rules.iptables_rules(f), &jumps())
                )
            })
            .collect(),
        (Backend::IptablesLegacy, true) => [Family::V4, Family::V6]
            .iter()
            .map(|&f| {
                format!(
                    "# {} --noflush\n{}",
                    f.restore(),
                    iptables_uninstall_input(&jumps(), true, true)
                )
            })
            .collect(),
    }
}

/// Runs a tool, feeding it `stdin`; its stdout on success, its stderr in the error otherwise.
fn tool(
    name: &'static str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<std::process::Output, InitError> {
    let mut child = Command::new(name)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InitError::Missing {
                tool: name,
                package,
                source,
            },
            _ => InitError::Spawn { tool: name, source },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| InitError::Spawn { tool: name, source })?;
    }
    child
        .wait_with_output()
        .map_err(|source| InitError::Spawn { tool: name, source })
}

fn checked(
    name: &'static str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, InitError> {
    let output = tool(name, package, args, stdin)?;
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
            stderr.push_str(
                " (run it as root or with CAP_NET_ADMIN; iptables-legacy also needs CAP_NET_RAW)",
            );
        }
        return Err(InitError::Failed {
            tool: name,
            args: args.join(" "),
            status: output.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Our table's listing, or None when there is none.
fn nft_current() -> Result<Option<String>, InitError> {
    let output = tool(
        "nft",
        "nftables",
        &["list", "table", "inet", NFT_TABLE],
        None,
    )?;
    if output.status.success() {
        return Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No such file or directory") {
        return Ok(None);
    }
    Err(InitError::Failed {
        tool: "nft",
        args: format!("list table inet {NFT_TABLE}"),
        status: output.status,
        stderr: stderr.trim().to_owned(),
    })
}

/// The fingerprint comment line of a table listing, if it is ours.
fn nft_marker(listing: &str) -> Option<&str> {
    listing
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("comment \"{NFT_MARKER}")))
}

fn nft_install(rules: &Rules) -> Result<bool, InitError> {
    let table = rules.nft_table();
    if let Some(listing) = nft_current()? {
        let Some(marker) = nft_marker(&listing) else {
            return Err(InitError::ForeignTable);
        };
        if table.lines().any(|l| l.trim() == marker) {
            return Ok(false);
        }
    }
    // Create-if-absent, delete and re-add in one transaction: there is never a moment with
    // half the rules.
    let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{table}");
    checked("nft", "nftables", &["-f", "-"], Some(&script))?;
    Ok(true)
}

fn nft_uninstall() -> Result<bool, InitError> {
    let Some(listing) = nft_current()? else {
        return Ok(false);
    };
    if nft_marker(&listing).is_none() {
        return Err(InitError::ForeignTable);
    }
    checked(
        "nft",
        "nftables",
        &["delete", "table", "inet", NFT_TABLE],
        None,
    )?;
    Ok(true)
}

/// What the `nat` table of one family holds of ours.
struct IptablesState {
    chains: [bool; 2],
    rules: Vec<String>,
    jumps: Vec<String>,
}

fn iptables_state(family: Family) -> Result<Option<IptablesState>, InitError> {
    let names = std::fs::read_to_string(family.table_names()).unwrap_or_default();
    if !names.lines().any(|l| l.trim() == "nat") {
        // No nat table yet in this namespace: nothing of ours can be there.
        return Ok(None);
    }
    let saved = checked(family.save(), "iptables", &["-t", "nat"], None)?;
    let own = |l: &&str| {
        l.starts_with(&format!("-A {CHAIN_OUTPUT} "))
            || l.starts_with(&format!("-A {CHAIN_PREROUTING} "))
    };
    let all_jumps = jumps();
    Ok(Some(IptablesState {
        chains: [CHAIN_OUTPUT, CHAIN_PREROUTING]
            .map(|c| saved.lines().any(|l| l.starts_with(&format!(":{c} ")))),
        rules: saved.lines().filter(own).map(str::to_owned).collect(),
        jumps: saved
            .lines()
            .filter(|l| all_jumps.iter().any(|j| j == l))
            .map(str::to_owned)
            .collect(),
    }))
}

fn iptables_install(rules: &Rules, family: Family) -> Result<bool, InitError> {
    let wanted = rules.iptables_rules(family);
    let all_jumps = jumps();
    let (current, present) = match iptables_state(family)? {
        Some(state) => (state.rules, state.jumps),
        None => (Vec::new(), Vec::new()),
    };
    let jumps_ok = all_jumps
        .iter()
        .all(|j| present.iter().filter(|p| *p == j).count() == 1);
    if current == wanted && jumps_ok {
        return Ok(false);
    }
    // Declaring our chains flushes them (or creates them); missing jumps are added. One commit.
    let missing: Vec<String> = all_jumps
        .iter()
        .filter(|j| !present.contains(j))
        .cloned()
        .collect();
    let input = iptables_install_input(&wanted, &missing);
    checked(family.restore(), "iptables", &["--noflush"], Some(&input))?;
    Ok(true)
}

fn iptables_uninstall_input(jumps: &[String], output: bool, prerouting: bool) -> String {
    let mut input = String::from("*nat\n");
    for jump in jumps {
        input.push_str(&jump.replacen("-A ", "-D ", 1));
        input.push('\n');
    }
    for (present, chain) in [(output, CHAIN_OUTPUT), (prerouting, CHAIN_PREROUTING)] {
        if present {
            input.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    input.push_str("COMMIT\n");
    input
}

fn iptables_uninstall(family: Family) -> Result<bool, InitError> {
    let Some(state) = iptables_state(family)? else {
        return Ok(false);
    };
    if state.jumps.is_empty() && !state.chains.iter().any(|c| *c) {
        return Ok(false);
    }
    let input = iptables_uninstall_input(&state.jumps, state.chains[0], state.chains[1]);
    checked(family.restore(), "iptables", &["--noflush"], Some(&input))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn rules(argv: &[&str]) -> Rules {
        let cli = Cli::try_parse_from(std::iter::once("init").chain(argv.iter().copied()))
            .expect("valid flags");
        Rules::from_args(&cli.init).expect("valid rules")
    }

    #[test]
    fn defaults_redirect_to_linkerd_ports_and_skip_the_proxy_user() {
        let table = rules(&[]).nft_table();
        assert!(table.contains("meta skuid 2102 return"));
        assert!(table.contains("redirect to :4140"));
        assert!(table.contains("redirect to :4143"));
        assert!(table.contains("tcp dport { 4191 } return"));
    }

    #[test]
    fn ports_merge_and_cidrs_split_by_family() {
        let r = rules(&[
            "--skip-outbound-ports",
            "25,22,23-24,9000-9100,9050",
            "--skip-outbound-cidrs",
            "10.1.2.3/8,fd00::/8,192.0.2.7",
        ]);
        assert!(r
            .nft_table()
            .contains("tcp dport { 22-25, 9000-9100 } return"));
        let v4 = r.iptables_rules(Family::V4);
        assert!(v4.contains(&"-A PYMESH_OUTPUT -d 10.0.0.0/8 -j RETURN".to_owned()));
        assert!(v4.contains(&"-A PYMESH_OUTPUT -d 192.0.2.7/32 -j RETURN".to_owned()));
        assert!(!v4.iter().any(|l| l.contains("fd00")));
        assert!(r
            .iptables_rules(Family::V6)
            .contains(&"-A PYMESH_OUTPUT -d fd00::/8 -j RETURN".to_owned()));
    }

    #[test]
    fn bad_input_names_the_value() {
        for (flag, value) in [
            ("--outbound-port", "70000"),
            ("--skip-inbound-ports", "0"),
            ("--skip-outbound-ports", "90-80"),
            ("--skip-outbound-cidrs", "10.0.0.0/33"),
        ] {
            let err = Cli::try_parse_from(["init", flag, value])
                .err()
                .expect("refused");
            let text = err.to_string();
            assert!(text.contains(value) && text.contains(flag), "{text}");
        }
        let same = Cli::try_parse_from(["init", "--inbound-port", "4140"]).expect("parses");
        assert!(Rules::from_args(&same.init).is_err());
    }

    #[test]
    fn the_fingerprint_follows_the_rules() {
        assert_eq!(rules(&[]).nft_table(), rules(&[]).nft_table());
        assert_ne!(
            rules(&[]).nft_table(),
            rules(&["--proxy-gid", "2102"]).nft_table()
        );
    }
}
