#!/usr/bin/env python3
"""Show what an operator sees through the broker's server reflection (like `grpcurl describe`): every RPC, message,
field and enum value of the jobbroker services, each with its comment from the .proto.

    describe.py                  # every jobbroker.* service the broker serves
    describe.py --check          # also exit 1 naming everything that has no comment

Needs no .proto files: the descriptors (with their comments) come from the broker.
"""

import argparse
import sys

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from broker_client import DEFAULT_BROKER

# Field numbers in google.protobuf.FileDescriptorProto / DescriptorProto / ServiceDescriptorProto /
# EnumDescriptorProto: the path of a SourceCodeInfo.Location that carries an element's comment.
FILE_MESSAGES, FILE_ENUMS, FILE_SERVICES = 4, 5, 6
MESSAGE_FIELDS, MESSAGE_NESTED, MESSAGE_ENUMS, MESSAGE_ONEOFS = 2, 3, 4, 8
SERVICE_METHODS, ENUM_VALUES = 2, 2


class Printer:
    def __init__(self):
        self.missing = []

    def element(self, indent: int, label: str, comments: dict, path: tuple, full_name: str = "") -> None:
        comment = " ".join(comments.get(path, "").split())
        print(f"{'  ' * indent}{label}" + (f"  // {comment}" if comment else "  (no comment)"))
        if not comment:
            self.missing.append(full_name or label)

    def enum(self, indent, prefix, enum, comments, path):
        self.element(indent, f"enum {prefix}{enum.name}", comments, path)
        for i, value in enumerate(enum.value):
            self.element(indent + 1, value.name, comments, path + (ENUM_VALUES, i), f"{prefix}{value.name}")

    def message(self, indent, prefix, message, comments, path):
        name = f"{prefix}{message.name}"
        self.element(indent, f"message {name}", comments, path)
        for i, oneof in enumerate(message.oneof_decl):
            oneof_path = path + (MESSAGE_ONEOFS, i)
            self.element(indent + 1, f"oneof {oneof.name}", comments, oneof_path, f"{name}.{oneof.name}")
        for i, field in enumerate(message.field):
            self.element(indent + 1, field.name, comments, path + (MESSAGE_FIELDS, i), f"{name}.{field.name}")
        for i, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:  # map<k, v> fields' generated entry types carry no comment
                self.message(indent + 1, f"{name}.", nested, comments, path + (MESSAGE_NESTED, i))
        for i, enum in enumerate(message.enum_type):
            self.enum(indent + 1, f"{name}.", enum, comments, path + (MESSAGE_ENUMS, i))

    def file(self, file) -> None:
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        print(f"// {file.name}")
        prefix = f"{file.package}."
        for i, service in enumerate(file.service):
            self.element(0, f"service {prefix}{service.name}", comments, (FILE_SERVICES, i))
            for j, method in enumerate(service.method):
                rpc = f"rpc {method.name}({method.input_type.lstrip('.')}) returns ({method.output_type.lstrip('.')})"
                self.element(1, rpc, comments, (FILE_SERVICES, i, SERVICE_METHODS, j))
        for i, message in enumerate(file.message_type):
            self.message(0, prefix, message, comments, (FILE_MESSAGES, i))
        for i, enum in enumerate(file.enum_type):
            self.enum(0, prefix, enum, comments, (FILE_ENUMS, i))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="host:port (default %(default)s, $JOBBROKER_BROKER)")
    parser.add_argument("--check", action="store_true", help="exit 1 if anything has no comment")
    args = parser.parse_args()
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(args.broker.removeprefix("http://")))
    services = [name for name in database.get_services() if name.startswith("jobbroker.")]
    # The files of the services and every jobbroker file they import, each once.
    files, pending = {}, [database.FindFileContainingSymbol(name) for name in services]
    while pending:
        file = pending.pop()
        if file.name not in files:
            files[file.name] = file
            pending += [database.FindFileByName(dep) for dep in file.dependency if dep.startswith("jobbroker/")]
    printer = Printer()
    for name in sorted(files):
        printer.file(files[name])
    if args.check and printer.missing:
        print(f"no comment on {len(printer.missing)} element(s): {', '.join(printer.missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
