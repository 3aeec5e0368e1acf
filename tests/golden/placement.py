#!/usr/bin/env python3
"""Independent reimplementation of shard-router placement (see src/map/placement.rs).

Prints hashes and ring placements used as golden vectors by the Rust tests, so the
vectors are checked against a second implementation, not just against themselves.
"""
import struct, sys

M = (1 << 64) - 1
def rotl(x, b): return ((x << b) | (x >> (64 - b))) & M

def siphash13(data: bytes, k0=0, k1=0) -> int:
    v0 = k0 ^ 0x736f6d6570736575; v1 = k1 ^ 0x646f72616e646f6d
    v2 = k0 ^ 0x6c7967656e657261; v3 = k1 ^ 0x7465646279746573
    def rnd(v0, v1, v2, v3):
        v0 = (v0 + v1) & M; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
        v2 = (v2 + v3) & M; v3 = rotl(v3, 16); v3 ^= v2
        v0 = (v0 + v3) & M; v3 = rotl(v3, 21); v3 ^= v0
        v2 = (v2 + v1) & M; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
        return v0, v1, v2, v3
    n = len(data); end = n - n % 8
    for i in range(0, end, 8):
        m = struct.unpack_from('<Q', data, i)[0]
        v3 ^= m; v0, v1, v2, v3 = rnd(v0, v1, v2, v3); v0 ^= m
    b = (n & 0xff) << 56
    for i, c in enumerate(data[end:]): b |= c << (8 * i)
    v3 ^= b; v0, v1, v2, v3 = rnd(v0, v1, v2, v3); v0 ^= b
    v2 ^= 0xff
    for _ in range(3): v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3

def ring(shards):  # shards: [(name, points)]
    pts = sorted((siphash13(f"{name}#{i}".encode()), name) for name, n in shards for i in range(n))
    return pts

def locate(pts, tenant):
    h = siphash13(tenant.encode())
    for ph, name in pts:
        if ph >= h: return name
    return pts[0][1]

if __name__ == "__main__":
    print(f"hash('')     = {siphash13(b''):#018x}")
    print(f"hash('acme') = {siphash13(b'acme'):#018x}")
    pts = ring([("a", 128), ("b", 128), ("c", 256)])
    tenants = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "t-000001"]
    print([locate(pts, t) for t in tenants])
