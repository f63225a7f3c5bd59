// SPDX-License-Identifier: EUPL-1.2
//! The macOS install path on paper: the file lists of the real `mlx-metal`
//! and `mlx` 0.32.4 macOS arm64 wheels (`testdata/wheels/`) are laid out as
//! empty files, the way `pip install --target` lays out the wheels, and the
//! MLX search must find (or reject, naming what is missing) the prefix in
//! them. Runs on any OS: the target OS is an argument.

mod wheels;

use std::cell::Cell;
use std::fs;
use std::path::Path;

use wheels::{METAL_WHEEL, MLX_WHEEL, lay_out, scratch, wheel_files};

use mlx_build::{Places, TargetOs, check_prefix, required_files, search};

/// Places that hold only the workspace: nothing from this machine's
/// environment, Homebrew or /usr/local.
fn places(workspace: &Path) -> Places {
    Places { mlx_dir: None, workspace: workspace.to_path_buf(), python: "python-under-test".into(), system: Vec::new() }
}

#[test]
fn the_fixture_records_the_metal_wheel_layout() {
    let files = wheel_files(METAL_WHEEL);
    assert_eq!(files.len(), 415);
    for key in [
        "mlx/include/mlx/mlx.h",
        "mlx/lib/libmlx.dylib",
        "mlx/lib/mlx.metallib",
        "mlx/share/cmake/MLX/MLXConfig.cmake",
        "mlx_metal-0.32.4.dist-info/RECORD",
    ] {
        assert!(files.iter().any(|f| f == key), "{key} is not in the recorded wheel");
    }
    // The metallib sits beside the library, where MLX looks for it.
    assert_eq!(Path::new("mlx/lib/mlx.metallib").parent(), Path::new("mlx/lib/libmlx.dylib").parent());
    // A macOS wheel: no Linux library, and everything lives under mlx/ or the dist-info.
    assert!(!files.iter().any(|f| f.ends_with(".so")));
    assert!(files.iter().all(|f| f.starts_with("mlx/") || f.starts_with("mlx_metal-0.32.4.dist-info/")));
    let libs: Vec<&String> = files.iter().filter(|f| f.starts_with("mlx/lib/") && !f.contains("/cmake/")).collect();
    assert_eq!(libs, ["mlx/lib/libjaccl.dylib", "mlx/lib/libmlx.dylib", "mlx/lib/mlx.metallib"]);

    // The `mlx` wheel is the Python bindings only: none of the native files.
    let py = wheel_files(MLX_WHEEL);
    assert_eq!(py.len(), 48);
    assert!(py.iter().any(|f| f == "mlx/core.cpython-312-darwin.so"));
    assert!(!py.iter().any(|f| f.starts_with("mlx/include/") || f.starts_with("mlx/lib/")));
    // Neither wheel has mlx/__init__.py: `mlx` is a namespace package both fill.
    assert!(!files.iter().chain(&py).any(|f| f == "mlx/__init__.py"));
}

#[test]
fn macos_needs_the_metallib_beside_the_dylib() {
    let names: Vec<&[&str]> = required_files(TargetOs::MacOs).iter().map(|r| r.any_of).collect();
    assert_eq!(names, [&["include/mlx/mlx.h"][..], &["lib/libmlx.dylib"], &["lib/mlx.metallib"]]);
    let names: Vec<&[&str]> = required_files(TargetOs::Linux).iter().map(|r| r.any_of).collect();
    assert_eq!(names, [&["include/mlx/mlx.h"][..], &["lib/libmlx.so"]]);
}

#[test]
fn the_metal_wheel_is_a_complete_macos_prefix() {
    let tmp = scratch();
    lay_out(tmp.path(), METAL_WHEEL, &[]);
    let prefix = tmp.path().join("mlx");
    assert_eq!(check_prefix(&prefix, TargetOs::MacOs), Ok(()));
    assert!(prefix.join("share/cmake/MLX/MLXConfig.cmake").is_file());
    // The same prefix is no use to a Linux build, and says why.
    let e = check_prefix(&prefix, TargetOs::Linux).unwrap_err();
    assert_eq!(e.missing.len(), 1);
    assert_eq!(e.missing[0].any_of, ["lib/libmlx.so"]);
    assert!(e.to_string().contains("lacks lib/libmlx.so (the library)"), "{e}");
}

#[test]
fn the_search_finds_the_xtask_setup_prefix_on_macos() {
    // `cargo xtask setup` runs `pip install --target <workspace>/target/mlx mlx-metal==0.32.4`.
    let ws = scratch();
    lay_out(&ws.path().join("target/mlx"), METAL_WHEEL, &[]);
    let asked = Cell::new(false);
    let found = search(&places(ws.path()), TargetOs::MacOs, |_| {
        asked.set(true);
        Vec::new()
    });
    assert_eq!(found, Ok(ws.path().join("target/mlx/mlx")));
    assert!(!asked.get(), "Python was asked although the setup prefix is complete");
}

#[test]
fn a_macos_prefix_without_the_metallib_is_named() {
    let ws = scratch();
    lay_out(&ws.path().join("target/mlx"), METAL_WHEEL, &["mlx/lib/mlx.metallib"]);
    let prefix = ws.path().join("target/mlx/mlx");

    let e = check_prefix(&prefix, TargetOs::MacOs).unwrap_err();
    assert_eq!(e.missing.iter().map(|r| r.any_of).collect::<Vec<_>>(), [&["lib/mlx.metallib"][..]]);
    assert!(!e.absent());
    // Linux does not want a metallib; the library is what it lacks there.
    assert_eq!(check_prefix(&prefix, TargetOs::Linux).unwrap_err().missing[0].any_of, ["lib/libmlx.so"]);

    let msg = search(&places(ws.path()), TargetOs::MacOs, |_| Vec::new()).unwrap_err();
    let line = format!(
        "cargo xtask setup prefix: {} (lacks lib/mlx.metallib (the Metal kernels, which MLX loads from beside \
         libmlx.dylib at run time))",
        prefix.display()
    );
    assert!(msg.contains(&line), "{msg}");
    assert!(msg.contains("Python mlx package (python-under-test): not importable"), "{msg}");
    assert!(msg.contains("holds include/mlx/mlx.h, lib/libmlx.dylib and lib/mlx.metallib,"), "{msg}");

    // An MLX_DIR that lacks it is an error on its own, naming the file.
    let mut p = places(ws.path());
    p.mlx_dir = Some(prefix.clone());
    let msg = search(&p, TargetOs::MacOs, |_| panic!("MLX_DIR is set: Python must not be asked")).unwrap_err();
    assert!(msg.contains(&format!("MLX_DIR={}", prefix.display())), "{msg}");
    assert!(
        msg.contains("is not a complete MLX prefix for macOS: it lacks lib/mlx.metallib (the Metal kernels"),
        "{msg}"
    );
}

#[test]
fn mlx_dir_pointing_at_site_packages_is_refused() {
    let sp = scratch();
    lay_out(sp.path(), METAL_WHEEL, &[]);
    let mut p = places(sp.path());
    p.mlx_dir = Some(sp.path().to_path_buf());
    let msg = search(&p, TargetOs::MacOs, |_| Vec::new()).unwrap_err();
    assert!(
        msg.contains(
            "it lacks include/mlx/mlx.h (the C++ headers), lib/libmlx.dylib (the library) and lib/mlx.metallib"
        ),
        "{msg}"
    );
    p.mlx_dir = Some(sp.path().join("mlx"));
    assert_eq!(search(&p, TargetOs::MacOs, |_| Vec::new()), Ok(sp.path().join("mlx")));
    p.mlx_dir = Some(sp.path().join("nowhere"));
    let msg = search(&p, TargetOs::MacOs, |_| Vec::new()).unwrap_err();
    assert!(msg.contains(&format!("MLX_DIR={} does not exist", sp.path().join("nowhere").display())), "{msg}");
}

#[test]
fn the_python_package_needs_mlx_metal_beside_it() {
    // `pip install mlx` on macOS brings mlx-metal, and both fill site-packages/mlx.
    let ws = scratch();
    let sp = scratch();
    lay_out(sp.path(), MLX_WHEEL, &[]);
    let folder = sp.path().join("mlx");

    // The `mlx` wheel alone (say, installed with --no-deps) is no prefix.
    let msg = search(&places(ws.path()), TargetOs::MacOs, |py| {
        assert_eq!(py, "python-under-test");
        vec![folder.clone()]
    })
    .unwrap_err();
    assert!(
        msg.contains(&format!("cargo xtask setup prefix: {} (not there)", ws.path().join("target/mlx/mlx").display())),
        "{msg}"
    );
    let line = format!("Python mlx package (python-under-test): {} (the Python bindings only: ", folder.display());
    assert!(msg.contains(&line), "{msg}");
    assert!(msg.contains("come in the mlx-metal, mlx-cpu or mlx-cuda-* wheel"), "{msg}");

    // With mlx-metal in the same site-packages it is.
    lay_out(sp.path(), METAL_WHEEL, &[]);
    assert_eq!(search(&places(ws.path()), TargetOs::MacOs, |_| vec![folder.clone()]), Ok(folder.clone()));
}

#[test]
fn a_namespace_package_split_over_two_folders_is_searched_in_both() {
    let ws = scratch();
    let user = scratch();
    let system = scratch();
    lay_out(user.path(), MLX_WHEEL, &[]);
    lay_out(system.path(), METAL_WHEEL, &[]);
    let found =
        search(&places(ws.path()), TargetOs::MacOs, |_| vec![user.path().join("mlx"), system.path().join("mlx")]);
    assert_eq!(found, Ok(system.path().join("mlx")));
}

#[test]
fn linux_prefixes_need_no_metallib() {
    // The mlx-cpu wheel's native part: headers and libmlx.so, no metallib.
    let ws = scratch();
    let prefix = ws.path().join("target/mlx/mlx");
    for f in ["include/mlx/mlx.h", "lib/libmlx.so", "share/cmake/MLX/MLXConfig.cmake"] {
        fs::create_dir_all(prefix.join(f).parent().unwrap()).unwrap();
        fs::File::create(prefix.join(f)).unwrap();
    }
    assert_eq!(check_prefix(&prefix, TargetOs::Linux), Ok(()));
    assert_eq!(search(&places(ws.path()), TargetOs::Linux, |_| Vec::new()), Ok(prefix.clone()));
    assert_eq!(check_prefix(&prefix, TargetOs::MacOs).unwrap_err().missing.len(), 2);
    // Other targets take either library, as before.
    assert_eq!(check_prefix(&prefix, TargetOs::Other), Ok(()));

    // A system place with no MLX at all is said to be just that.
    let bare = scratch();
    let mut p = places(bare.path());
    p.system = vec![("/usr/local".into(), bare.path().to_path_buf())];
    let msg = search(&p, TargetOs::Linux, |_| Vec::new()).unwrap_err();
    assert!(msg.contains(&format!("/usr/local: {} (no MLX there)", bare.path().display())), "{msg}");
    assert!(msg.contains("holds include/mlx/mlx.h and lib/libmlx.so,"), "{msg}");
}

#[test]
fn target_os_follows_cargo_cfg() {
    assert_eq!(TargetOs::from_cfg("macos"), TargetOs::MacOs);
    assert_eq!(TargetOs::from_cfg("linux"), TargetOs::Linux);
    assert_eq!(TargetOs::from_cfg("windows"), TargetOs::Other);
    assert_eq!(TargetOs::MacOs.to_string(), "macOS");
}
