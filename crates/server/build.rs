//! Compiles raftwork's declarations of etcd's v3 API (proto/, written from
//! etcd's API reference) into prost messages and tonic services, with
//! protox: no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/mvcc.proto",
        "proto/rpc.proto",
        "proto/internal.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(["."])
        .compile_fds(fds)?;
    Ok(())
}
