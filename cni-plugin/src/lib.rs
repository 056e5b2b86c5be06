//! Myelin's CNI plugin: the binary container runtimes execute once per pod and command.
//!
//! It parses the runtime's environment and stdin ([`env`](mod@env), [`config`]), asks the node's agent
//! for an address and an endpoint over its unix socket, creates and configures the pod's veth
//! pair ([`veth`], over [`netlink`], inside the pod's namespace through [`netns`]), and prints
//! the result ([`result`]) or the error ([`error`], which holds the table of codes). Every step
//! of an ADD is undone when a later one fails ([`commands`]).

pub mod commands;
pub mod config;
pub mod env;
pub mod error;
pub mod log;
pub mod netlink;
pub mod netns;
pub mod result;
pub mod version;
pub mod veth;

use std::{
    io::{self, IsTerminal, Read},
    process::ExitCode,
};

use crate::{
    env::CniEnv,
    error::{CniError, ErrorCode},
};

/// The whole plugin: reads the process environment and stdin, runs the command, prints its
/// answer or error on stdout.
pub fn main() -> ExitCode {
    let stdin = match read_stdin() {
        Ok(stdin) => stdin,
        Err(e) => {
            let err = CniError::new(
                ErrorCode::IoFailure,
                "cannot read the network configuration from stdin",
            )
            .caused_by(&e);
            return fail(&err, &[]);
        }
    };
    let outcome = CniEnv::from_process()
        .map_err(CniError::from)
        .and_then(|env| commands::run(&env, &stdin));
    match outcome {
        Ok(answer) => {
            if let Some(answer) = answer {
                println!("{answer}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err, &stdin),
    }
}

fn fail(err: &CniError, stdin: &[u8]) -> ExitCode {
    println!("{}", err.to_json(config::reply_version(stdin).as_str()));
    ExitCode::FAILURE
}

/// A person running `CNI_COMMAND=VERSION myelin` in a terminal gets an answer instead of a
/// plugin waiting for input; runtimes always pass a pipe.
fn read_stdin() -> io::Result<Vec<u8>> {
    let mut stdin = io::stdin();
    let mut data = Vec::new();
    if !stdin.is_terminal() {
        stdin.read_to_end(&mut data)?;
    }
    Ok(data)
}
