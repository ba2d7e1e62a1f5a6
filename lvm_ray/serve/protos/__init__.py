"""Generated gRPC code of lvm.proto (committed; see the header of lvm.proto)."""
