//! `opendps certificate …`: CA certificates on the service, as `az iot dps certificate` manages
//! them on Azure (upload, verify by proof of possession, list, show, delete), and a test PKI to try
//! X.509 attestation with.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use dps_tools::pki::TestChain;
use reqwest::Method;
use serde_json::json;

use super::{CommandContext, encode};

/// `opendps certificate …`.
#[derive(Debug, Subcommand)]
pub enum CertificateCommand {
    /// Upload a CA certificate (the root or intermediate that signs devices' certificates).
    Create {
        /// The certificate's name.
        #[arg(long, visible_alias = "cn")]
        certificate_name: String,
        /// PEM or DER file of the CA certificate.
        #[arg(long, visible_alias = "p")]
        path: PathBuf,
        /// Upload it as already verified (skips proof of possession).
        #[arg(long, visible_alias = "v", default_value_t = false, action = clap::ArgAction::Set)]
        verified: bool,
    },
    /// List the CA certificates.
    List,
    /// Show one CA certificate.
    Show {
        /// The certificate's name.
        #[arg(long, visible_alias = "cn")]
        certificate_name: String,
    },
    /// Delete a CA certificate.
    Delete {
        /// The certificate's name.
        #[arg(long, visible_alias = "cn")]
        certificate_name: String,
        /// Its etag; the delete fails if it changed.
        #[arg(long, visible_alias = "e")]
        etag: Option<String>,
    },
    /// Generate a verification code: sign a certificate with this CN using the CA's key, then
    /// `verify` it.
    GenerateVerificationCode {
        /// The certificate's name.
        #[arg(long, visible_alias = "cn")]
        certificate_name: String,
        /// Its etag.
        #[arg(long, visible_alias = "e")]
        etag: Option<String>,
    },
    /// Verify a CA certificate with a proof of possession: a certificate whose subject CN is the
    /// verification code, signed by the CA's key.
    Verify {
        /// The certificate's name.
        #[arg(long, visible_alias = "cn")]
        certificate_name: String,
        /// PEM or DER file of the verification certificate.
        #[arg(long, visible_alias = "p")]
        path: PathBuf,
        /// Its etag.
        #[arg(long, visible_alias = "e")]
        etag: Option<String>,
    },
    /// TEST MATERIAL ONLY: write a root CA, an intermediate CA and device certificates (with their
    /// private keys, unencrypted) to try X.509 attestation with.
    MakeTestChain {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "opendps-test-pki")]
        out: PathBuf,
        /// Registration ids of the devices (each becomes a certificate's CN; repeatable).
        #[arg(long = "device", default_values_t = ["device-1".to_owned()])]
        devices: Vec<String>,
    },
}

/// Runs a `certificate` command.
pub async fn run(ctx: &CommandContext, cmd: CertificateCommand) -> anyhow::Result<()> {
    let path = |name: &str| format!("/certificates/{}", encode(name));
    let read = |file: &Path| -> anyhow::Result<String> {
        let bytes =
            std::fs::read(file).with_context(|| format!("while reading {}", file.display()))?;
        Ok(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(binary) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(binary.as_bytes())
            }
        })
    };
    match cmd {
        CertificateCommand::Create {
            certificate_name,
            path: file,
            verified,
        } => {
            let client = ctx.client().await?;
            let body = json!({"certificate": read(&file)?, "isVerified": verified});
            let (cert, _) = client
                .send(
                    Method::PUT,
                    &path(&certificate_name),
                    None,
                    &[],
                    Some(&body),
                )
                .await?;
            ctx.output.print_item(&cert);
        }
        CertificateCommand::List => {
            let client = ctx.client().await?;
            let (list, _) = client
                .send(Method::GET, "/certificates", None, &[], None)
                .await?;
            let items = list["value"].as_array().cloned().unwrap_or_default();
            let rows: Vec<_> = items
                .iter()
                .map(|c| {
                    json!({
                        "name": c["name"],
                        "subject": c["properties"]["subject"],
                        "isVerified": c["properties"]["isVerified"],
                        "expiry": c["properties"]["expiry"],
                    })
                })
                .collect();
            ctx.output.print_list(
                &rows,
                &[
                    ("NAME", "name"),
                    ("SUBJECT", "subject"),
                    ("VERIFIED", "isVerified"),
                    ("EXPIRY", "expiry"),
                ],
            );
        }
        CertificateCommand::Show { certificate_name } => {
            let client = ctx.client().await?;
            let (cert, _) = client
                .send(Method::GET, &path(&certificate_name), None, &[], None)
                .await?;
            ctx.output.print_item(&cert);
        }
        CertificateCommand::Delete {
            certificate_name,
            etag,
        } => {
            let client = ctx.client().await?;
            client
                .send(
                    Method::DELETE,
                    &path(&certificate_name),
                    etag.as_deref(),
                    &[],
                    None,
                )
                .await?;
            ctx.output
                .done(&format!("Deleted the certificate '{certificate_name}'."));
        }
        CertificateCommand::GenerateVerificationCode {
            certificate_name,
            etag,
        } => {
            let client = ctx.client().await?;
            let (cert, _) = client
                .send(
                    Method::POST,
                    &format!("{}/generateVerificationCode", path(&certificate_name)),
                    etag.as_deref(),
                    &[],
                    Some(&json!({})),
                )
                .await?;
            ctx.output.print_item(&cert);
        }
        CertificateCommand::Verify {
            certificate_name,
            path: file,
            etag,
        } => {
            let client = ctx.client().await?;
            let body = json!({"certificate": read(&file)?});
            let (cert, _) = client
                .send(
                    Method::POST,
                    &format!("{}/verify", path(&certificate_name)),
                    etag.as_deref(),
                    &[],
                    Some(&body),
                )
                .await?;
            ctx.output.print_item(&cert);
        }
        CertificateCommand::MakeTestChain { out, devices } => make_test_chain(&out, &devices)?,
    }
    Ok(())
}

/// Writes the test PKI: `root.pem`/`root.key`, `intermediate.pem`/`intermediate.key`, and for each
/// device `{id}.pem` (its certificate then the intermediate: the chain a device sends) and
/// `{id}.key`.
fn make_test_chain(out: &Path, devices: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("while creating {}", out.display()))?;
    let write = |name: &str, text: &[u8]| -> anyhow::Result<PathBuf> {
        let file = out.join(name);
        std::fs::write(&file, text).with_context(|| format!("while writing {}", file.display()))?;
        Ok(file)
    };
    let chain = TestChain::generate()?;
    write("root.pem", chain.root_pem.as_bytes())?;
    write("root.key", chain.root_key_pem.as_bytes())?;
    write("intermediate.pem", chain.intermediate_pem.as_bytes())?;
    write("intermediate.key", chain.intermediate_key_pem.as_bytes())?;
    for id in devices {
        let device = chain.device(id)?;
        write(&format!("{id}.pem"), &device.chain_pem)?;
        write(&format!("{id}.key"), &device.key_pem)?;
    }
    println!(
        "Wrote TEST certificates and UNENCRYPTED keys to {} (never use them in production):",
        out.display()
    );
    println!("  root.pem, root.key                  the root CA: upload it and verify it");
    println!("  intermediate.pem, intermediate.key  the CA that signs the devices");
    for id in devices {
        println!("  {id}.pem, {id}.key  device {id} (its certificate, then the intermediate)");
    }
    println!("Next:");
    println!(
        "  opendps certificate create --certificate-name test-root --path {}",
        out.join("root.pem").display()
    );
    println!(
        "  opendps certificate generate-verification-code --certificate-name test-root   # then sign a certificate with CN=<code> using root.key, and:"
    );
    println!(
        "  opendps certificate verify --certificate-name test-root --path <proof.pem>   (or create with --verified true)"
    );
    println!(
        "  opendps enrollment-group create --enrollment-id test-devices --attestation-type x509 --certificate-path {}",
        out.join("intermediate.pem").display()
    );
    if let Some(id) = devices.first() {
        println!(
            "  opendps device register --registration-id {id} --cert {} --key {}",
            out.join(format!("{id}.pem")).display(),
            out.join(format!("{id}.key")).display()
        );
    }
    Ok(())
}
