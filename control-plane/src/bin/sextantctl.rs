//! `sextantctl`: see `sextant_control_plane::cli`.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = sextant_control_plane::cli::Cli::parse();
    match sextant_control_plane::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let line = e.to_string().replace('\n', "; ");
            eprintln!("error: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}
