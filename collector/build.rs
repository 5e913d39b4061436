//! Embeds the kernel program built by `cargo xtask build-ebpf`, so that the release binary is
//! self-contained. Without the object the build stops here with a message naming that command.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MRTE_EBPF_OBJECT");
    let path = match std::env::var_os("MRTE_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("ebpf")
            .join("collector-ebpf.o"),
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        eprintln!(
            "\nerror: the eBPF object {} does not exist.\n\
             Build the kernel program first:  cargo xtask build-ebpf --release\n\
             (or build everything with `cargo xtask build`; `cargo xtask setup` installs the \
             toolchain it needs)\n",
            path.display()
        );
        std::process::exit(1);
    }
    let path = path
        .canonicalize()
        .expect("canonical path of the eBPF object");
    println!("cargo:rustc-env=MRTE_EBPF_OBJECT={}", path.display());
}
