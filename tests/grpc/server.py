"""The gRPC backend of tests/tests/l7_grpc.rs: grpcio's server (the C core) speaking h2c on
127.0.0.1. Prints "PORT <n>" once it listens, then serves until it is killed.

Usage: server.py STUBS_DIR
"""
import sys
import time

sys.path.insert(0, sys.argv[1])

from concurrent import futures  # noqa: E402

import grpc  # noqa: E402

import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402


class Echo(echo_pb2_grpc.EchoServicer):
    def Unary(self, request, context):
        rid = dict(context.invocation_metadata()).get("x-request-id", "")
        context.send_initial_metadata([("x-initial", "i-" + rid)])
        context.set_trailing_metadata([("x-trailer", "t-" + rid)])
        return echo_pb2.Msg(text=request.text[::-1], n=len(request.text))

    def ServerStream(self, request, context):
        for i in range(request.n):
            yield echo_pb2.Msg(text=f"{request.text}-{i}", n=i)

    def ClientStream(self, request_iterator, context):
        texts = [m.text for m in request_iterator]
        return echo_pb2.Msg(text="+".join(texts), n=len(texts))

    def Bidi(self, request_iterator, context):
        for m in request_iterator:
            yield echo_pb2.Msg(text=m.text.upper(), n=m.n)

    def Fail(self, request, context):
        status = echo_pb2.Status(
            code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
            message="bad text: " + request.text,
            details=[echo_pb2.Any(type_url="type.lb.test/lbtest.Msg",
                                  value=echo_pb2.Msg(text=request.text, n=7).SerializeToString())],
        )
        context.set_trailing_metadata([
            ("grpc-status-details-bin", status.SerializeToString()),
            ("x-error-trailer", "why-" + request.text),
            ("x-error-bin", b"\x00\x01\xfe\xff"),
        ])
        # Non-ASCII so that grpc-message's percent-encoding is exercised end to end.
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad text: " + request.text + " \u2603")

    def Deadline(self, request, context):
        remaining = context.time_remaining()
        if request.text == "remaining":
            return echo_pb2.Msg(text="remaining", n=-1 if remaining is None else int(remaining * 1000))
        if request.text == "expire":
            # A full second before the deadline, so that on a loaded machine the server's status
            # still arrives before the client's own timer fires.
            time.sleep(max(0.0, (remaining or 0.0) - 1.0))
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "server saw its deadline")
        time.sleep(request.n / 1000)
        return echo_pb2.Msg(text="slept", n=request.n)


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
