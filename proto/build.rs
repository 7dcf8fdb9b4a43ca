//! Generates `proto::wire` from `declip.proto` with a vendored protoc (nothing to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=declip.proto");
    tonic_prost_build::configure().compile_protos(&["declip.proto"], &["."])?;
    Ok(())
}
