#!/usr/bin/env python3
"""Writes a docker-archive made of files already on this machine (binaries, libraries and text
from /usr, so it compresses like a real image), as IMAGE.tar and IMAGE.tar.gz.

usage: gen-image.py OUT_PREFIX [--layers 60] [--size-mb 900] [--change-layer N]

--change-layer N adds a small file with fresh content to layer N (1-based), so exactly one
layer differs from the archive written without it. Layer 1 holds /bin/busybox, so the image
runs `/bin/busybox echo ok`.
"""
import argparse, gzip, hashlib, io, json, os, shutil, subprocess, tarfile, tempfile, time

ROOTS = ["/usr/bin", "/usr/lib", "/usr/libexec", "/usr/share", "/usr/sbin"]


def candidate_files(max_size):
    seen = set()
    for root in ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not os.path.isfile(path) or os.path.islink(path) or st.st_size == 0 or st.st_size > max_size:
                    continue
                if (st.st_dev, st.st_ino) in seen or not os.access(path, os.R_OK):
                    continue
                seen.add((st.st_dev, st.st_ino))
                yield path, st.st_size


def add_file(tar, arcname, path=None, data=None, mode=0o644):
    info = tarfile.TarInfo(arcname)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = mode
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.size = os.path.getsize(path)
        with open(path, "rb") as f:
            tar.addfile(info, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--size-mb", type=int, default=900)
    ap.add_argument("--change-layer", type=int, default=0)
    args = ap.parse_args()
    budget = args.size_mb << 20
    weight = lambda n: 3 if n % 10 == 2 else 1
    per_layer = budget // sum(weight(n) for n in range(1, args.layers + 1))
    files = candidate_files(min(16 << 20, max(per_layer // 4, 1 << 20)))
    work = tempfile.mkdtemp(prefix="gen-image-")
    layers = []
    total = 0
    try:
        for n in range(1, args.layers + 1):
            path = os.path.join(work, f"{n}.tar")
            # Layer sizes vary like a real image: a few big, many small.
            target = per_layer * weight(n) if n < args.layers else budget - total
            with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
                if n == 1:
                    add_file(tar, "bin/busybox", "/bin/busybox", mode=0o755)
                for src, fsize in files:
                    add_file(tar, f"layer{n}{src}", src, mode=0o755)
                    if tar.offset + (1 << 20) >= target:
                        break
                # After the size check, so the layers that follow hold the same files.
                if n == args.change_layer:
                    add_file(tar, "etc/changed", data=f"changed at {time.time_ns()}\n".encode())
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            layers.append((path, "sha256:" + h.hexdigest()))
            total += os.path.getsize(path)
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "echo", "ok"]},
            "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
        }, sort_keys=True).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        names = [f"{d[7:]}/layer.tar" for _, d in layers]
        manifest = json.dumps([{"Config": config_name, "RepoTags": ["bench:latest"], "Layers": names}]).encode()
        with tarfile.open(args.out + ".tar", "w", format=tarfile.GNU_FORMAT) as out:
            for (path, _), name in zip(layers, names):
                add_file(out, name, path)
            add_file(out, config_name, data=config)
            add_file(out, "manifest.json", data=manifest)
        gz = shutil.which("pigz") or "gzip"
        with open(args.out + ".tar", "rb") as src, open(args.out + ".tar.gz", "wb") as dst:
            subprocess.run([gz, "-6", "-n", "-c"], stdin=src, stdout=dst, check=True)
        print(f"{args.out}.tar: {len(layers)} layers, {total >> 20} MiB of layers")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
