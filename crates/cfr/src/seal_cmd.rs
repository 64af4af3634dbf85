//! `cfr egress keygen` and `cfr egress open`: the operator's side of sealed egress addresses. Both
//! work offline: no relay, no network.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cfr_egress::seal::{
    combine_shares, epochs_around, open_address, read_key_file, split_master, unix_now,
    write_key_file, KeyFile, MasterKey, OpeningKey, SealLayout, SealParams,
};
use clap::Args;
use ipnet::IpNet;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Key file to write (mode 0600; never overwritten). Without --shares: the master key. With
    /// --shares: the relay key (from the current epoch on) and FILE.share-1 … FILE.share-N.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Epoch length: addresses open to an epoch of this length, and the relay ratchets its key once
    /// per epoch.
    #[arg(long, default_value_t = SealParams::DEFAULT_EPOCH_SECS)]
    epoch_secs: u64,
    /// Bits of the subscriber handle (handles 1 … 2^bits − 1).
    #[arg(long, default_value_t = SealParams::DEFAULT_HANDLE_BITS)]
    handle_bits: u32,
    /// Check bits: a random address or wrong key opens to a false match with probability 2^-bits
    /// per (epoch, instance) tried.
    #[arg(long, default_value_t = SealParams::DEFAULT_CHECK_BITS)]
    check_bits: u32,
    /// Split the master key into N shares of which K open addresses (K/N, e.g. 2/3); the master key
    /// itself is then never written.
    #[arg(long, value_name = "K/N")]
    shares: Option<String>,
}

#[derive(Args, Debug)]
pub struct DeriveArgs {
    /// The master key file.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Relay key file to write (mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// First epoch the relay key can seal: the epoch of this time [default: now].
    #[arg(long, value_name = "RFC3339-TIME")]
    from: Option<String>,
}

#[derive(Args, Debug)]
pub struct OpenArgs {
    /// Master or relay key file (mode 0600).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "share",
        conflicts_with = "share"
    )]
    key: Option<PathBuf>,
    /// A key share (repeat for K shares) instead of --key.
    #[arg(long, value_name = "FILE")]
    share: Vec<PathBuf>,
    /// When the address was seen (RFC 3339, e.g. 2026-12-03T10:02:00Z).
    #[arg(long, value_name = "RFC3339-TIME")]
    at: String,
    /// The egress prefix the address belongs to [default: its /64 for IPv6; required for IPv4].
    #[arg(long, value_name = "CIDR")]
    prefix: Option<IpNet>,
    /// Epochs tried on each side of the epoch of --at.
    #[arg(long, default_value_t = 1)]
    window: u64,
    /// Relay instances sharing the key (egress.instance_id 0 … N−1).
    #[arg(long, default_value_t = 1)]
    instances: u32,
    /// The address to open.
    address: IpAddr,
}

fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{unix}"))
}

pub fn keygen(args: KeygenArgs) -> Result<ExitCode, String> {
    let now = unix_now();
    let epoch_secs = args.epoch_secs.max(1);
    let params = SealParams {
        // Epoch boundaries on whole multiples of the epoch length (whole hours by default).
        origin: now - now % epoch_secs,
        epoch_secs: args.epoch_secs,
        handle_bits: args.handle_bits,
        check_bits: args.check_bits,
    };
    params.validate().map_err(|e| e.to_string())?;
    let master = MasterKey::generate();
    let write = |path: &Path, file: &KeyFile| {
        write_key_file(path, file).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    match args.shares {
        None => {
            write(
                &args.out,
                &KeyFile::Master {
                    params,
                    key: master,
                },
            )?;
            println!("wrote the master key to {} (mode 0600)", args.out.display());
            println!("  give the relay this file (egress.sealing_key); it derives its epoch key and erases the master from memory");
            println!("  keep a copy offline with whoever answers abuse and lawful requests: it opens every sealed address");
        }
        Some(spec) => {
            let (k, n) = spec
                .split_once('/')
                .and_then(|(k, n)| {
                    Some((k.trim().parse::<u8>().ok()?, n.trim().parse::<u8>().ok()?))
                })
                .ok_or_else(|| format!("--shares {spec:?}: expected K/N, e.g. 2/3"))?;
            let shares = split_master(params, &master, k, n).map_err(|e| e.to_string())?;
            let epoch = params.epoch_at(now).unwrap_or(0);
            write(
                &args.out,
                &KeyFile::Relay {
                    params,
                    chain: master.chain_at(epoch),
                },
            )?;
            println!(
                "wrote the relay key to {} (mode 0600): it seals from {} on and cannot open anything earlier",
                args.out.display(),
                rfc3339(params.epoch_start(epoch))
            );
            for (i, share) in shares.iter().enumerate() {
                let path = PathBuf::from(format!("{}.share-{}", args.out.display(), i + 1));
                write(&path, share)?;
                println!("wrote share {} of {n} to {}", i + 1, path.display());
            }
            println!("  any {k} of the {n} shares open addresses (cfr egress open --share FILE …); give each share to a different person");
            println!("  the master key was never written");
        }
    }
    println!(
        "  epochs of {} s from {}; {} handle bits, {} check bits: prefixes need at least {} host bits",
        params.epoch_secs,
        rfc3339(params.origin),
        params.handle_bits,
        params.check_bits,
        params.needed_bits()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_time(flag: &str, text: &str) -> Result<u64, String> {
    let t = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{flag} {text:?}: not an RFC 3339 time ({e})"))?;
    u64::try_from(t.unix_timestamp()).map_err(|_| format!("{flag} is before 1970"))
}

/// Writes a relay key (the chain key of one epoch) from the master key, so the master can stay off
/// the relay: a relay that holds only this cannot open anything sealed before that epoch.
pub fn derive(args: DeriveArgs) -> Result<ExitCode, String> {
    let from = match &args.from {
        Some(t) => parse_time("--from", t)?,
        None => unix_now(),
    };
    let KeyFile::Master { params, key } = read_key_file(&args.key).map_err(|e| e.to_string())?
    else {
        return Err(format!("{} is not a master key", args.key.display()));
    };
    let epoch = params.epoch_at(from).ok_or_else(|| {
        format!(
            "--from is before the key's first epoch ({})",
            rfc3339(params.origin)
        )
    })?;
    let relay = KeyFile::Relay {
        params,
        chain: key.chain_at(epoch),
    };
    write_key_file(&args.out, &relay)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!(
        "wrote a relay key to {} (mode 0600): it seals from {} on and cannot open anything earlier",
        args.out.display(),
        rfc3339(params.epoch_start(epoch))
    );
    Ok(ExitCode::SUCCESS)
}

pub fn open(args: OpenArgs) -> Result<ExitCode, String> {
    let at = parse_time("--at", &args.at)?;
    let (params, key) = match &args.key {
        Some(path) => {
            let file = read_key_file(path).map_err(|e| e.to_string())?;
            let params = *file.params();
            match file {
                KeyFile::Master { key, .. } => (params, OpeningKey::Master(key)),
                KeyFile::Relay { chain, .. } => (params, OpeningKey::Chain(chain)),
                KeyFile::Share { .. } => {
                    return Err(format!(
                        "{} is a share: pass it with --share",
                        path.display()
                    ))
                }
            }
        }
        None => {
            let files = args
                .share
                .iter()
                .map(|p| read_key_file(p).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            let (params, master) = combine_shares(&files).map_err(|e| e.to_string())?;
            (params, OpeningKey::Master(master))
        }
    };
    let prefix = match (args.prefix, args.address) {
        (Some(p), _) => p,
        (None, IpAddr::V6(a)) => IpNet::new(IpAddr::V6(a), 64)
            .map_err(|e| e.to_string())?
            .trunc(),
        (None, IpAddr::V4(_)) => return Err("--prefix CIDR is required for IPv4 addresses".into()),
    };
    if !prefix.contains(&args.address) {
        return Err(format!("{} is not inside --prefix {prefix}", args.address));
    }
    let layout = SealLayout::for_prefix(prefix, &params).map_err(|e| e.to_string())?;
    let host = match args.address {
        IpAddr::V6(a) => u128::from(a),
        IpAddr::V4(a) => u128::from(u32::from(a)),
    };
    let iid = host & u128::MAX.checked_shr(128 - layout.width()).unwrap_or(0);
    let epochs = epochs_around(&params, at, args.window).ok_or_else(|| {
        format!(
            "--at {} is before the key's first epoch ({})",
            args.at,
            rfc3339(params.origin)
        )
    })?;
    let instances = args.instances.max(1);
    let tried = (epochs.end() - epochs.start() + 1) * u64::from(instances);
    let found = open_address(&key, &layout, iid, epochs.clone(), 0..=instances - 1);
    drop(key);
    if found.is_empty() {
        println!(
            "no match (epochs {}–{}, {} instance(s): {tried} tried)",
            epochs.start(),
            epochs.end(),
            instances
        );
        return Ok(ExitCode::from(1));
    }
    for o in &found {
        let handle = if o.subscriber.0 == 0 {
            "anonymous".to_string()
        } else {
            o.subscriber.0.to_string()
        };
        println!(
            "subscriber {handle}  epoch {} ({} – {})  instance {}",
            o.epoch,
            rfc3339(params.epoch_start(o.epoch)),
            rfc3339(params.epoch_start(o.epoch + 1)),
            o.instance
        );
    }
    if found.len() > 1 {
        println!("more than one match: at most one is the tunnel's (each other (epoch, instance) tried matches by chance with probability 2^-{})", params.check_bits);
    }
    Ok(ExitCode::SUCCESS)
}
