//! `myelin`, the CNI plugin binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    myelin_cni::main()
}
