//! `pinner-docs OUT_DIR`: man pages (OUT_DIR/man/*.8, pinner.toml.5) and
//! shell completions (OUT_DIR/completions/) generated from the command-line
//! definitions and the configuration keys, so they never drift from the
//! binaries. Run by `scripts/package`. `pinner-docs --sources REPO` rewrites
//! the files kept in the repository from the same keys (`scripts/generate`).

mod pages;

use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;
use std::path::Path;
use std::process::ExitCode;

/// The hook has no argument parser of its own (it must start fast); this
/// describes the interface libvirt calls it with.
fn hook_command() -> Command {
    Command::new("pinner-hook")
        .version(env!("CARGO_PKG_VERSION"))
        .about("libvirt qemu hook: hands domain events to the pinner daemon")
        .long_about(
            "Installed as /etc/libvirt/hooks/qemu.d/50-pinner (libvirt >= 6.5) or \
             /etc/libvirt/hooks/qemu. libvirt runs it on every qemu domain event with the \
             domain XML on stdin. It reads the domain's name, UUID and vCPU count, sends one \
             event to the daemon at /run/pinner/pinner.sock with a hard deadline, makes no \
             libvirt call, and exits 0 within milliseconds whatever state the daemon is in; \
             an event it cannot deliver is logged to journald (identifier pinner-hook) and \
             caught up by the daemon's periodic reconcile. For migrate and restore it prints \
             the domain XML back on stdout. Run by hand without arguments it prints usage \
             and exits 2.",
        )
        .arg(Arg::new("OBJECT").help("The domain's name").required(true))
        .arg(
            Arg::new("OPERATION")
                .help("prepare, start, started, stopped, release, migrate, restore, reconnect or attach")
                .required(true),
        )
        .arg(Arg::new("SUB_OPERATION").help("begin, end or -"))
        .arg(
            Arg::new("EXTRA")
                .help("Extra argument libvirt passes (usually -)")
                .action(ArgAction::Append),
        )
}

/// The page of `command` and one per subcommand ("pinner-status.8"), in
/// section 8: system administration.
fn write_man(dir: &Path, command: Command) -> std::io::Result<()> {
    let mut command = command.disable_help_subcommand(true);
    command.build();
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(dir, sub.clone())?;
    }
    let name = command.get_name().to_string();
    let source = format!("pinner {}", env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(command).section("8").source(source);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    if name == "pinner" {
        man.render_subcommands_section(&mut page)?;
    }
    page.extend(pages::sections_of(&name).into_bytes());
    man.render_version_section(&mut page)?;
    std::fs::write(dir.join(man.get_filename()), page)
}

fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    write_man(&man, pinner::cli::Cli::command())?;
    write_man(&man, hook_command())?;
    std::fs::write(man.join("pinner.toml.5"), pages::config_page())?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(
            shell,
            &mut pinner::cli::Cli::command(),
            "pinner",
            &completions,
        )?;
    }
    Ok(())
}

/// The generated files the repository keeps, for readers without a build.
fn write_sources(repo: &Path) -> std::io::Result<()> {
    use pinner::config::keys;
    std::fs::write(repo.join("packaging/pinner.toml"), keys::shipped_file())?;
    std::fs::write(repo.join("docs/configuration.md"), keys::markdown())
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let result = match args.as_slice() {
        [flag, repo] if flag == "--sources" => write_sources(Path::new(repo)),
        [out] => generate(Path::new(out)),
        _ => {
            eprintln!("usage: pinner-docs OUT_DIR | pinner-docs --sources REPO");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinner-docs: {e}");
            ExitCode::FAILURE
        }
    }
}
