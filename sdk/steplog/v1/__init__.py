"""Generated protocol code for steplog.v1 (make protos). Do not edit."""
