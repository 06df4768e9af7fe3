//! `raftwork completions <shell>` and `raftwork man [command]`: shell
//! completion scripts and roff man pages, generated on stdout from the
//! binary's own clap definitions (passed in by `main`, which owns them), so
//! they cannot drift from the flags.
//!
//! `raftwork man` is raftwork(1), whose SUBCOMMANDS section refers to
//! raftwork-serve(1) and the others; `raftwork man serve` prints that page
//! (a top-level command's page; nested ones such as `kv put` are listed on
//! their parent's page).
//!
//! Output is built in memory and then written, since clap_complete panics
//! on a failed write: a closed pipe is an error message and exit 1.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;

/// Flags of `raftwork completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// Flags of `raftwork man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// A command whose page to print instead of raftwork(1), e.g. `serve`
    /// for raftwork-serve(1).
    pub command: Option<String>,
}

/// Prints the completion script of `cli` for `args.shell`.
pub fn completions(mut cli: clap::Command, args: CompletionsArgs) -> ExitCode {
    let name = cli.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cli, name, &mut out);
    print(&out)
}

/// Prints the man page of `cli`, or of its command `args.command` (exit 2
/// if it has none of that name).
pub fn man(cli: clap::Command, args: ManArgs) -> ExitCode {
    match man_page(cli, args.command.as_deref()) {
        Ok(page) => print(&page),
        Err(e) => {
            eprintln!("raftwork: {e}");
            ExitCode::from(2)
        }
    }
}

/// The roff source of `cli`'s page, or of its command `command`'s.
pub fn man_page(cli: clap::Command, command: Option<&str>) -> Result<Vec<u8>, String> {
    // Built, so that commands carry their display names (raftwork-serve),
    // as clap_mangen's own generate_to does; no `help` command to document.
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    // Every page's footer names the tool and its version, not the command.
    let source = format!(
        "{} {}",
        cli.get_name(),
        cli.get_version().unwrap_or_default()
    );
    let page = match command {
        None => cli,
        Some(name) => cli
            .get_subcommands()
            .find(|c| c.get_name() == name && !c.is_hide_set())
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = cli
                    .get_subcommands()
                    .filter(|c| !c.is_hide_set())
                    .map(|c| c.get_name())
                    .collect();
                format!("no command {name:?} (one of {})", names.join(", "))
            })?,
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .source(source)
        .render(&mut out)
        .map_err(|e| format!("cannot render the man page: {e}"))?;
    Ok(out)
}

fn print(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftwork: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("tool")
            .version("1.0")
            .subcommand(clap::Command::new("serve").arg(clap::arg!(--"data-dir" <DIR> "Where")))
            .subcommand(clap::Command::new("kv"))
    }

    #[test]
    fn pages_of_the_tool_and_of_a_command() {
        let top = String::from_utf8(man_page(cli(), None).unwrap()).unwrap();
        assert!(top.contains(".TH tool 1  \"tool 1.0\""), "{top}");
        assert!(top.contains("tool\\-serve(1)"), "{top}");
        let serve = String::from_utf8(man_page(cli(), Some("serve")).unwrap()).unwrap();
        assert!(serve.contains(".TH tool-serve 1  \"tool 1.0\""), "{serve}");
        assert!(serve.contains("data\\-dir"), "{serve}");
        let err = man_page(cli(), Some("nope")).unwrap_err();
        assert!(err.contains("serve, kv"), "{err}");
        // No page for clap's help command.
        assert!(man_page(cli(), Some("help")).is_err());
    }
}
