"""The gRPC clients of tests/tests/l7_grpc.rs: runs every call shape against TARGET with one of two
independent implementations (grpcio: the C core; grpclib: pure Python on h2) and prints one JSON
object, case name -> what the client observed. The Rust test asserts on it; a case that raised
reports {"error": ...} and the others still run, so one failure does not hide the rest.

Usage: client.py STUBS_DIR {grpcio|grpclib} HOST:PORT [CA_PEM SERVER_NAME]
"""
import asyncio
import json
import queue
import sys
import time

sys.path.insert(0, sys.argv[1])

import echo_pb2  # noqa: E402

# Every call is bounded; the deadline cases set their own, shorter ones.
CALL_TIMEOUT = 10.0


def status_details(raw):
    """grpc-status-details-bin decoded as google.rpc.Status (our own copy of its layout)."""
    if raw is None:
        return None
    s = echo_pb2.Status.FromString(raw)
    inner = [echo_pb2.Msg.FromString(a.value) for a in s.details]
    return {
        "code": s.code,
        "message": s.message,
        "types": [a.type_url for a in s.details],
        "texts": [m.text for m in inner],
        "ns": [m.n for m in inner],
    }


def run_grpcio(target, ca, name):
    import grpc

    import echo_pb2_grpc

    if ca is None:
        channel = grpc.insecure_channel(target)
    else:
        with open(ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        # The C core refuses a TLS connection whose ALPN did not select h2, so any call that
        # succeeds here also proves ALPN.
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
    stub = echo_pb2_grpc.EchoStub(channel)

    def unary():
        reply, call = stub.Unary.with_call(
            echo_pb2.Msg(text="hello"), timeout=CALL_TIMEOUT, metadata=[("x-request-id", "r1")]
        )
        return {
            "text": reply.text,
            "n": reply.n,
            "code": call.code().name,
            "initial": dict(call.initial_metadata()).get("x-initial"),
            "trailing": dict(call.trailing_metadata()).get("x-trailer"),
        }

    def server_stream():
        return {"texts": [m.text for m in stub.ServerStream(echo_pb2.Msg(text="s", n=5), timeout=CALL_TIMEOUT)]}

    def client_stream():
        reply = stub.ClientStream(iter([echo_pb2.Msg(text=t) for t in ["a", "b", "c", "d"]]), timeout=CALL_TIMEOUT)
        return {"text": reply.text, "n": reply.n}

    def bidi():
        # Each request is sent only after the previous reply arrived: a proxy that buffered
        # the request or the response stream whole would hang here until the timeout.
        q = queue.Queue()

        def requests():
            while True:
                m = q.get()
                if m is None:
                    return
                yield m

        replies = stub.Bidi(requests(), timeout=CALL_TIMEOUT)
        texts = []
        for i, t in enumerate(["x", "y", "z"]):
            q.put(echo_pb2.Msg(text=t, n=i))
            texts.append(next(replies).text)
        q.put(None)
        rest = list(replies)
        return {"texts": texts, "rest": len(rest), "code": replies.code().name}

    def fail():
        try:
            stub.Fail(echo_pb2.Msg(text="oops"), timeout=CALL_TIMEOUT)
            return {"code": "OK"}
        except grpc.RpcError as e:
            tm = dict(e.trailing_metadata() or ())
            return {
                "code": e.code().name,
                "message": e.details(),
                "details": status_details(tm.get("grpc-status-details-bin")),
                "trailer": tm.get("x-error-trailer"),
                "bin": tm["x-error-bin"].hex() if "x-error-bin" in tm else None,
            }

    def deadline_remaining():
        return {"n": stub.Deadline(echo_pb2.Msg(text="remaining"), timeout=5.0).n}

    def deadline(text, n, timeout):
        start = time.monotonic()
        try:
            stub.Deadline(echo_pb2.Msg(text=text, n=n), timeout=timeout)
            return {"code": "OK"}
        except grpc.RpcError as e:
            return {"code": e.code().name, "message": e.details(), "elapsed": time.monotonic() - start}

    cases = {
        "unary": unary,
        "server_stream": server_stream,
        "client_stream": client_stream,
        "bidi": bidi,
        "fail": fail,
        "deadline_remaining": deadline_remaining,
        "deadline_expire": lambda: deadline("expire", 0, 3.0),
        "deadline_sleep": lambda: deadline("sleep", 3000, 0.5),
    }
    out = {}
    for k, f in cases.items():
        try:
            out[k] = f()
        except Exception as e:  # noqa: BLE001 - reported to the Rust test, which fails on it
            out[k] = {"error": repr(e)}
    channel.close()
    return out


async def run_grpclib(target, ca, name):
    import ssl

    from grpclib.client import Channel
    from grpclib.config import Configuration
    from grpclib.encoding.base import StatusDetailsCodecBase
    from grpclib.exceptions import GRPCError

    import echo_grpc

    class RawDetails(StatusDetailsCodecBase):
        """Hands grpc-status-details-bin over undecoded (no googleapis-common-protos here)."""

        def encode(self, status, message, details):
            raise NotImplementedError

        def decode(self, status, message, data):
            return data

    host, port = target.rsplit(":", 1)
    ctx = None
    config = None
    if ca is not None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["h2"])
        config = Configuration(ssl_target_name_override=name)
    channel = Channel(host, int(port), ssl=ctx, config=config, status_details_codec=RawDetails())
    stub = echo_grpc.EchoStub(channel)

    async def unary():
        async with stub.Unary.open(timeout=CALL_TIMEOUT, metadata={"x-request-id": "r1"}) as s:
            await s.send_message(echo_pb2.Msg(text="hello"), end=True)
            reply = await s.recv_message()
            await s.recv_trailing_metadata()
            out = {
                "text": reply.text,
                "n": reply.n,
                "code": "OK",
                "initial": s.initial_metadata.get("x-initial"),
                "trailing": s.trailing_metadata.get("x-trailer"),
            }
        if ca is not None:
            # The protocol the TLS handshake chose, as the connection saw it.
            transport = channel._protocol.connection._transport  # noqa: SLF001 - no public API
            out["alpn"] = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        return out

    async def server_stream():
        async with stub.ServerStream.open(timeout=CALL_TIMEOUT) as s:
            await s.send_message(echo_pb2.Msg(text="s", n=5), end=True)
            texts = [m.text async for m in s]
        return {"texts": texts}

    async def client_stream():
        async with stub.ClientStream.open(timeout=CALL_TIMEOUT) as s:
            for t in ["a", "b", "c", "d"]:
                await s.send_message(echo_pb2.Msg(text=t))
            await s.end()
            reply = await s.recv_message()
        return {"text": reply.text, "n": reply.n}

    async def bidi():
        async with stub.Bidi.open(timeout=CALL_TIMEOUT) as s:
            texts = []
            for i, t in enumerate(["x", "y", "z"]):
                await s.send_message(echo_pb2.Msg(text=t, n=i))
                texts.append((await s.recv_message()).text)
            await s.end()
            rest = [m async for m in s]
        return {"texts": texts, "rest": len(rest), "code": "OK"}

    async def fail():
        async with stub.Fail.open(timeout=CALL_TIMEOUT) as s:
            await s.send_message(echo_pb2.Msg(text="oops"), end=True)
            try:
                await s.recv_message()
                return {"code": "OK"}
            except GRPCError as e:
                tm = s.trailing_metadata or {}
                return {
                    "code": e.status.name,
                    "message": e.message,
                    "details": status_details(e.details),
                    "trailer": tm.get("x-error-trailer"),
                    "bin": tm["x-error-bin"].hex() if "x-error-bin" in tm else None,
                }

    async def deadline_remaining():
        return {"n": (await stub.Deadline(echo_pb2.Msg(text="remaining"), timeout=5.0)).n}

    async def deadline(text, n, timeout):
        start = time.monotonic()
        try:
            await stub.Deadline(echo_pb2.Msg(text=text, n=n), timeout=timeout)
            return {"code": "OK"}
        except GRPCError as e:
            return {"code": e.status.name, "message": e.message, "elapsed": time.monotonic() - start}
        except asyncio.TimeoutError:
            # grpclib reports its own deadline firing as a timeout, not a status.
            return {"code": "DEADLINE_EXCEEDED", "message": None, "elapsed": time.monotonic() - start}

    cases = {
        "unary": unary,
        "server_stream": server_stream,
        "client_stream": client_stream,
        "bidi": bidi,
        "fail": fail,
        "deadline_remaining": deadline_remaining,
        "deadline_expire": lambda: deadline("expire", 0, 3.0),
        "deadline_sleep": lambda: deadline("sleep", 3000, 0.5),
    }
    out = {}
    for k, f in cases.items():
        try:
            out[k] = await f()
        except Exception as e:  # noqa: BLE001 - reported to the Rust test, which fails on it
            out[k] = {"error": repr(e)}
    channel.close()
    return out


def main():
    impl, target = sys.argv[2], sys.argv[3]
    ca, name = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else (None, None)
    if impl == "grpcio":
        out = run_grpcio(target, ca, name)
    else:
        out = asyncio.run(run_grpclib(target, ca, name))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
