//! What a container runtime does with the store before it starts a container: resolve an
//! image by name, record the container (so the collector keeps the image while it runs),
//! unpack the image's layers into a new root filesystem, and — when the container is
//! removed — drop the record, so a later `gc` may collect the image.
//!
//! ```text
//! store --root /tmp/store import app.tar --base-name example.com/app
//! cargo run --example unpack -- /tmp/store example.com/app:latest /tmp/rootfs web
//! ```

use layerstore::unpack::UnpackOptions;
use layerstore::{Options, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, image, dir, name] = args.as_slice() else {
        return Err("usage: unpack ROOT IMAGE DIR CONTAINER-NAME".into());
    };
    let store = Store::open(root, Options::default().create(false))?;
    // The container holds the image from now on: no collection removes it meanwhile.
    let container = store.container_create(image, Some(name))?;
    // For an index, the platform of this machine is picked (UnpackOptions::platform).
    let report = match store.unpack(image, std::path::Path::new(dir), &UnpackOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            // Nothing was unpacked (a failed unpack leaves no directory): let go.
            store.container_remove(&container.id)?;
            return Err(e.into());
        }
    };
    println!(
        "container {} ({name}): {} layers, {} entries, {} bytes in {} ms into {dir}",
        &container.id[..12],
        report.layers,
        report.entries,
        report.bytes,
        report.elapsed_ms
    );
    println!("remove it with: store --root {root} container rm {name}");
    Ok(())
}
