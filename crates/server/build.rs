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
    // The JSON gateway's serde impls (proto field names, as etcd's
    // gateway writes them).
    let descriptors = prost::Message::encode_to_vec(&fds);
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[".etcdserverpb", ".mvccpb"])?;
    // The messages have no floats: Eq lets the state machine's commands and
    // responses, which carry them, be compared whole.
    let oneofs = [
        ".raftwork.etcd.Request.request",
        ".raftwork.etcd.Response.response",
        ".etcdserverpb.RequestOp.request",
        ".etcdserverpb.ResponseOp.response",
        ".etcdserverpb.Compare.target_union",
        ".etcdserverpb.WatchRequest.request_union",
    ];
    let mut config = tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(["."])
        .message_attribute(".", "#[derive(Eq)]");
    for oneof in oneofs {
        config = config.enum_attribute(oneof, "#[derive(Eq)]");
    }
    config.compile_fds(fds)?;
    Ok(())
}
