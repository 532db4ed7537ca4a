#!/usr/bin/env python3
"""Push single-layer images made from root fs tars, plus one image index, to a
registry (Docker Registry HTTP API v2, plain http).  Used by scripts/setup.sh.

  push-index.py REGISTRY REPO TAG CONFIG.json ARCH=ROOTFS.tar [ARCH=ROOTFS.tar ...]

CONFIG.json holds the image's runtime config ({"Env": [...], "Cmd": [...], ...}).
Each ARCH (amd64, arm64) becomes a Docker schema 2 image manifest tagged
TAG-ARCH (config: architecture/os of that platform, one gzip layer = the tar);
TAG gets a Docker manifest list referencing them with their platforms, which
Docker 20.10 and Podman 4 both resolve to the native image.  The gzip'd layer
is kept next to the tar (ROOTFS.tar.gz) and reused while it is newer.  Blobs
the registry has already are not sent again.  Prints the list's digest.
"""
import hashlib, http.client, json, os, subprocess, sys, time, urllib.parse

MT_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
VARIANT = {"arm64": "v8"}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Registry:
    def __init__(self, host, repo):
        self.host, self.repo = host, repo

    def req(self, method, path, body=None, headers=None, length=None):
        for attempt in range(5):
            conn = http.client.HTTPConnection(self.host, timeout=600)
            try:
                h = dict(headers or {})
                if length is not None:
                    h["Content-Length"] = str(length)
                if hasattr(body, "seek"):
                    body.seek(0)
                conn.request(method, path, body=body, headers=h)
                r = conn.getresponse()
                data = r.read()
                return r.status, r.headers, data
            except (OSError, http.client.HTTPException) as e:
                if attempt == 4:
                    raise
                print(f"push: {method} {path}: {e}; retrying", file=sys.stderr)
                time.sleep(1 + attempt)
            finally:
                conn.close()

    def has_blob(self, digest):
        st, _, _ = self.req("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        return st == 200

    def put_blob(self, digest, path=None, data=None):
        if self.has_blob(digest):
            return False
        st, hd, body = self.req("POST", f"/v2/{self.repo}/blobs/uploads/", length=0)
        if st != 202:
            sys.exit(f"push: starting an upload failed: {st} {body[:300]!r}")
        loc = urllib.parse.urlsplit(hd["Location"])
        q = loc.query + ("&" if loc.query else "") + "digest=" + urllib.parse.quote(digest)
        hdr = {"Content-Type": "application/octet-stream"}
        if path is not None:
            with open(path, "rb") as f:
                st, _, body = self.req("PUT", f"{loc.path}?{q}", f, hdr, os.path.getsize(path))
        else:
            st, _, body = self.req("PUT", f"{loc.path}?{q}", data, hdr, len(data))
        if st != 201:
            sys.exit(f"push: blob {digest} upload failed: {st} {body[:300]!r}")
        return True

    def put_manifest(self, ref, mediatype, data):
        st, hd, body = self.req("PUT", f"/v2/{self.repo}/manifests/{ref}", data,
                                {"Content-Type": mediatype}, len(data))
        if st != 201:
            sys.exit(f"push: manifest {ref} refused: {st} {body[:500]!r}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        got = hd.get("Docker-Content-Digest")
        if got and got != digest:
            sys.exit(f"push: registry says {got} for manifest {ref}, expected {digest}")
        return digest


def main():
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    host, repo, tag, cfgfile = sys.argv[1:5]
    runtime = json.load(open(cfgfile))
    reg = Registry(host, repo)
    entries = []
    for spec in sys.argv[5:]:
        arch, tar = spec.split("=", 1)
        t0 = time.time()
        gz = tar + ".gz"
        if not (os.path.exists(gz) and os.path.getmtime(gz) >= os.path.getmtime(tar)):
            with open(gz + ".tmp", "wb") as out:
                subprocess.run(["gzip", "-n", "-6", "-c", tar], stdout=out, check=True)
            os.replace(gz + ".tmp", gz)
        diff_id, layer = sha256_file(tar), sha256_file(gz)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(tar)))
        config = {
            "architecture": arch,
            "os": "linux",
            "created": created,
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created, "created_by": "nixctr scripts/nix-image/build-rootfs.sh " + arch}],
        }
        if arch in VARIANT:
            config["variant"] = VARIANT[arch]
        cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        cfg_digest = "sha256:" + hashlib.sha256(cfg).hexdigest()
        sent = reg.put_blob(layer, path=gz)
        reg.put_blob(cfg_digest, data=cfg)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "size": len(cfg), "digest": cfg_digest},
            "layers": [{"mediaType": MT_LAYER, "size": os.path.getsize(gz), "digest": layer}],
        }, indent=3).encode()
        mdigest = reg.put_manifest(f"{tag}-{arch}", MT_MANIFEST, manifest)
        platform = {"architecture": arch, "os": "linux"}
        if arch in VARIANT:
            platform["variant"] = VARIANT[arch]
        entries.append({"mediaType": MT_MANIFEST, "size": len(manifest), "digest": mdigest,
                        "platform": platform})
        print(f"push: {repo}:{tag}-{arch} = {mdigest} (image id {cfg_digest[:19]}, layer "
              f"{os.path.getsize(gz) >> 20} MiB {'sent' if sent else 'already there'}, "
              f"{time.time() - t0:.0f}s)", file=sys.stderr)
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_LIST, "manifests": entries},
                       indent=3).encode()
    print(reg.put_manifest(tag, MT_LIST, index))


if __name__ == "__main__":
    main()
