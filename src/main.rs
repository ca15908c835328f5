//! The `pgweir` command: parses arguments, sets up logging and the runtime, and calls into the library.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgweir::auth::md5::md5_verifier;
use pgweir::auth::scram::ScramVerifier;
use pgweir::config::Config;

#[derive(Parser)]
#[command(
    name = "pgweir",
    version,
    about = "A multi-tenant PostgreSQL edge proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local PostgreSQL cluster, pgweir in front of it and a demo tenant; print its connection string.
    Dev {
        /// Folder for the cluster, certificate and generated config (reused on the next run).
        #[arg(long, default_value = "./.pgweir/dev")]
        data_dir: PathBuf,
        /// Address pgweir listens on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
        /// Address of the admin HTTP listener (health, readiness, Prometheus metrics).
        #[arg(long, default_value = "127.0.0.1:9930")]
        admin_listen: std::net::SocketAddr,
    },
    /// Run the proxy from a config file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file; list every problem and exit non-zero if there are any.
    CheckConfig { file: PathBuf },
    /// Turn a password into a SCRAM-SHA-256 verifier for the config (reads the password from stdin if not given).
    HashPassword {
        password: Option<String>,
        /// Also print the md5 hash for this user name (for tenants that allow md5).
        #[arg(long)]
        md5_user: Option<String>,
        #[arg(long, default_value_t = 4096)]
        iterations: u32,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGWEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// mimalloc: small per-allocation overhead and little fragmentation, which is most of what an idle client costs
/// besides its session state.
#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc through its plain entry points where the alignment allows: the mimalloc crate always calls the
/// aligned ones, which take extra steps (a generic path for every block over 1 KiB, such as the future of each
/// transaction). A block whose address does not have the alignment asked for (mimalloc's blocks are 16-byte
/// aligned from 16 bytes on, so this is not expected) is given back and taken from the aligned entry point.
struct Mimalloc;

/// Alignments the plain entry points may give (checked for every block all the same).
const PLAIN_ALIGN: usize = 16;

/// A block for `layout` from mimalloc's `plain` entry point when it can have the alignment and does, else from
/// its `aligned` one.
///
/// # Safety
/// As for [`std::alloc::GlobalAlloc::alloc`].
unsafe fn plain_or_aligned(
    layout: std::alloc::Layout,
    plain: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void,
) -> *mut u8 {
    if layout.align() <= PLAIN_ALIGN {
        let p = plain(layout.size());
        if (p as usize) & (layout.align() - 1) == 0 {
            return p.cast();
        }
        libmimalloc_sys::mi_free(p);
    }
    aligned(layout.size(), layout.align()).cast()
}

// SAFETY: every block comes from mimalloc with at least the size and alignment of its layout (checked, or asked
// for), and every block is given back to mimalloc's `mi_free` or `mi_realloc_aligned`, which take blocks of both
// kinds.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        plain_or_aligned(
            layout,
            libmimalloc_sys::mi_malloc,
            libmimalloc_sys::mi_malloc_aligned,
        )
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        plain_or_aligned(
            layout,
            libmimalloc_sys::mi_zalloc,
            libmimalloc_sys::mi_zalloc_aligned,
        )
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // Rare enough to keep the one entry point that can keep the alignment and, failing, the block.
        libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
    }
}

fn main() -> ExitCode {
    // No transparent huge pages for this process: its heap is many small per-client objects, and 2 MiB pages
    // would make memory grow (and stay) in 2 MiB steps. (Where the kernel has no THP, the call fails harmlessly.)
    // SAFETY: prctl with integer arguments only; it changes no memory this program uses.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {} problem(s):", file.display(), e.0.len());
                for p in &e.0 {
                    eprintln!("  - {p}");
                }
                ExitCode::FAILURE
            }
        },
        Command::HashPassword {
            password,
            md5_user,
            iterations,
        } => {
            let password = match password {
                Some(p) => p,
                None => {
                    if std::io::stdin().is_terminal() {
                        eprint!("password: ");
                        let _ = std::io::stderr().flush();
                    }
                    let mut line = String::new();
                    if std::io::stdin().lock().read_line(&mut line).is_err() {
                        eprintln!("could not read a password from stdin");
                        return ExitCode::FAILURE;
                    }
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            if password.is_empty() || !(1..=10_000_000).contains(&iterations) {
                eprintln!("the password must not be empty and iterations must be 1..=10000000");
                return ExitCode::FAILURE;
            }
            println!("{}", ScramVerifier::generate(&password, iterations));
            if let Some(user) = md5_user {
                println!("{}", md5_verifier(&password, &user));
            }
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            init_tracing();
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: invalid config:\n{e}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            let result = pgweir::server::runtime(cfg.proxy.worker_threads)
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let (directory, control) =
                            pgweir::catalog::control::directory_for(&cfg).await?;
                        let server =
                            pgweir::server::Server::bind_with_control(cfg, directory, control)
                                .await?;
                        server.proxy().set_config_path(config.clone());
                        server.run(pgweir::server::shutdown_signal()).await;
                        anyhow::Ok(())
                    })
                });
            report(result)
        }
        Command::Dev {
            data_dir,
            listen,
            admin_listen,
        } => {
            init_tracing();
            // Several threads: the embedded cluster is started and stopped on one of them (`block_in_place`).
            let result = pgweir::server::runtime(0)
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(pgweir::dev::run(pgweir::dev::DevOptions {
                        data_dir,
                        listen,
                        admin_listen,
                    }))
                });
            report(result)
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgweir: {e:#}");
            ExitCode::FAILURE
        }
    }
}
