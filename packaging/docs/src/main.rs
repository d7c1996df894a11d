//! `pinner-docs OUT_DIR`: man pages (OUT_DIR/man/*.8) and shell completions
//! (OUT_DIR/completions/) generated from the command-line definitions, so
//! they never drift from the binaries. Run by `scripts/package`.

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
    let man = clap_mangen::Man::new(command).section("8");
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(dir.join(man.get_filename()), page)
}

fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    write_man(&man, pinner::cli::Cli::command())?;
    write_man(&man, hook_command())?;
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

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: pinner-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinner-docs: {e}");
            ExitCode::FAILURE
        }
    }
}
