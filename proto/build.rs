//! Compiles every `.proto` of Kiln into Rust, plus one descriptor set for reflection.
//! This is the only build script in the workspace that generates code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "inference/grpc_service.proto",
        "inference/model_config.proto",
        "kiln/v1/models.proto",
        "kiln/v1/training.proto",
        "kiln/v1/cluster.proto",
        "kiln/v1/generate.proto",
        "kiln/v1/tokens.proto",
        "kiln/internal/v1/worker.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kiln_descriptor.bin"))
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .bytes(".kiln.internal.v1")
        .compile_protos(&protos, &["."])?;
    Ok(())
}
