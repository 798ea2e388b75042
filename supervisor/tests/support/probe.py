"""An independent gRPC health client (grpcio-health-checking) for quiesce's probe tests.

    probe.py check ADDR SERVICE [--ua AGENT]      print SERVING / NOT_SERVING / NOT_FOUND / UNAVAILABLE
    probe.py poll ADDR PERIOD_MS SERVICE... [--ua AGENT]
                                                  kubelet-like loop: one line "SERVICE STATUS" per check
    probe.py watch ADDR SERVICE                   print each status the Watch stream sends
"""
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(addr, ua):
    opts = [("grpc.primary_user_agent", ua)] if ua else []
    return grpc.insecure_channel(addr, options=opts)


def check(stub, service):
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return e.code().name


def main(argv):
    ua = None
    if "--ua" in argv:
        i = argv.index("--ua")
        ua = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    mode, addr = argv[0], argv[1]
    stub = health_pb2_grpc.HealthStub(channel(addr, ua))
    if mode == "check":
        print(check(stub, argv[2]), flush=True)
    elif mode == "poll":
        period = int(argv[2]) / 1000.0
        services = argv[3:]
        while True:
            for s in services:
                print(f"{s or '-'} {check(stub, s)}", flush=True)
            time.sleep(period)
    elif mode == "watch":
        try:
            for r in stub.Watch(health_pb2.HealthCheckRequest(service=argv[2])):
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status), flush=True)
        except grpc.RpcError as e:
            print(e.code().name, flush=True)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
