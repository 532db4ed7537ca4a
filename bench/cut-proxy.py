#!/usr/bin/env python3
"""An HTTP proxy in front of a docker-registry for the push benchmark: streams every request
(one per connection) and, with --cut-at-half-of SIZE, cuts the client's connection once,
halfway through the first PATCH whose body is SIZE bytes (a blob of that size going up whole).

The registry keeps what arrived: distribution binds an upload's offset into its Location
(`_state`), so it would lose a session whose PATCH was cut; the proxy sends the cut PATCH on as
a complete, shorter one and sends later requests of that session to the newest Location the
registry gave, as a registry that supports resuming would behave.

usage: cut-proxy.py LISTEN_PORT UPSTREAM_PORT [--cut-at-half-of SIZE]   (prints "ready")
"""
import argparse, re, socket, sys, threading

lock = threading.Lock()
sessions = {}  # upload uuid -> newest path?query
cut_done = False


def uuid_of(path):
    m = re.search(r"/blobs/uploads/([^/?]+)", path)
    return m.group(1) if m else None


def read_head(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line.decode("latin-1").rstrip("\r\n"))


def serve(client, upstream, cut_size):
    global cut_done
    f = client.makefile("rb", buffering=256 << 10)
    head = read_head(f)
    if not head:
        return
    method, path, _ = head[0].split(" ", 2)
    headers = [h for h in head[1:] if h.split(":", 1)[0].lower() not in ("connection", "content-length")]
    length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length:")), 0)
    uuid = uuid_of(path)
    with lock:
        if uuid in sessions:
            own = [kv for kv in path.partition("?")[2].split("&") if kv and not kv.startswith("_state=")]
            path = sessions[uuid] + "".join(("&" if "?" in sessions[uuid] or i else "?") + kv for i, kv in enumerate(own))
        cut_at = None
        if method == "PATCH" and cut_size and length == cut_size and not cut_done:
            cut_done, cut_at = True, length // 2
    up = socket.create_connection(("127.0.0.1", upstream))
    send_length = cut_at if cut_at is not None else length
    out = [f"{method} {path} HTTP/1.1"] + headers
    if length or any(h.lower().startswith("content-length:") for h in head[1:]):
        out.append(f"Content-Length: {send_length}")
    out.append("Connection: close")
    up.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
    left = send_length
    while left > 0:
        data = f.read(min(left, 256 << 10))
        if not data:
            break
        up.sendall(data)
        left -= len(data)
    if cut_at is not None:
        client.shutdown(socket.SHUT_RDWR)
    answer = b""
    while True:
        data = up.recv(256 << 10)
        if not data:
            break
        answer += data
    up.close()
    head_end = answer.find(b"\r\n\r\n")
    lines = answer[:head_end].decode("latin-1").split("\r\n")
    kept = []
    for line in lines:
        name, _, value = line.partition(":")
        if name.lower() == "connection":
            continue
        if name.lower() == "location" and uuid_of(value) and "/v2/" in value:
            with lock:
                sessions[uuid_of(value)] = value[value.index("/v2/"):].strip()
        kept.append(line)
    if cut_at is not None:
        print(f"cut a PATCH of {length} bytes at {cut_at}", file=sys.stderr, flush=True)
        return
    client.sendall(("\r\n".join(kept) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + answer[head_end + 4:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("listen", type=int)
    p.add_argument("upstream", type=int)
    p.add_argument("--cut-at-half-of", type=int, default=0)
    args = p.parse_args()
    server = socket.create_server(("127.0.0.1", args.listen))
    print("ready", flush=True)
    while True:
        client, _ = server.accept()

        def run(c=client):
            try:
                serve(c, args.upstream, args.cut_at_half_of)
            except OSError:
                pass
            finally:
                c.close()

        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    main()
