//! `raftwork tls init`: a certificate authority and one certificate per
//! member, for a local or test cluster with peer TLS.
//!
//! Each member's certificate names the member (a DNS SAN equal to its
//! `--name`), which is what `raftwork serve` checks a peer's certificate
//! against, plus `localhost`, `127.0.0.1` and any `--hosts`; it serves both
//! TLS sides (server and client auth), as a peer dials and is dialed.
//!
//! ```text
//! DIR/ca.pem          the CA certificate   (--peer-trusted-ca-file)
//! DIR/ca-key.pem      the CA's key (0600; keep it to issue more, or delete it)
//! DIR/<name>.pem      a member's certificate (--peer-cert-file)
//! DIR/<name>-key.pem  its key, 0600        (--peer-key-file)
//! ```
//!
//! For production, issue certificates from your own CA with the same SANs;
//! nothing else here is special.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::serve::parse_name;

/// Flags of `raftwork tls init`.
#[derive(Debug, Clone, Args)]
pub struct TlsInitArgs {
    /// Member names, comma-separated (each gets NAME.pem and NAME-key.pem).
    #[arg(long, value_delimiter = ',', required = true, value_parser = parse_name)]
    pub names: Vec<String>,
    /// Directory to write into; created if missing. Existing files are never
    /// overwritten.
    #[arg(long)]
    pub out: PathBuf,
    /// More host names or IP addresses every certificate is valid for,
    /// comma-separated (localhost and 127.0.0.1 always are).
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Days the certificates are valid for, from now [default: 365].
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub days: u32,
}

/// Runs `raftwork tls init`: exit 0 with the files written, 1 on an error
/// (nothing is overwritten; a partly written directory says which file).
pub fn run(args: TlsInitArgs) -> ExitCode {
    match init(&args) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raftwork tls init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the CA and one certificate per name into `args.out`; returns the
/// files written.
pub fn init(args: &TlsInitArgs) -> Result<Vec<PathBuf>, String> {
    let mut names = args.names.clone();
    names.sort();
    names.dedup();
    if names.len() != args.names.len() {
        return Err("a name is given twice".into());
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let mut planned = vec![args.out.join("ca.pem"), args.out.join("ca-key.pem")];
    for name in &args.names {
        planned.push(args.out.join(format!("{name}.pem")));
        planned.push(args.out.join(format!("{name}-key.pem")));
    }
    if let Some(existing) = planned.iter().find(|p| p.exists()) {
        return Err(format!("{} exists; not overwriting", existing.display()));
    }

    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that lag this one.
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(i64::from(args.days));
    let err = |e: rcgen::Error| e.to_string();

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "raftwork cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    write(&planned[0], ca.pem().as_bytes(), false)?;
    write(&planned[1], ca_key.serialize_pem().as_bytes(), true)?;

    for name in &args.names {
        let mut sans = vec![name.clone(), "localhost".into(), "127.0.0.1".into()];
        sans.extend(args.hosts.iter().cloned());
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(sans).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(err)?;
        write(
            &args.out.join(format!("{name}.pem")),
            cert.pem().as_bytes(),
            false,
        )?;
        write(
            &args.out.join(format!("{name}-key.pem")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
    }
    Ok(planned)
}

/// Creates `path` (never overwriting) with `bytes`; a key is readable by
/// its owner only.
fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut f = options
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
