"""Manifests for running a pdserve cluster elsewhere: Kubernetes StatefulSets, RoleBasedGroup, docker
compose and PAI-EAS (`pdserve deploy`, cli.py). common.py holds the layout and the command lines every
target runs; each target module only says where they run. Nothing here starts or contacts anything.
"""
