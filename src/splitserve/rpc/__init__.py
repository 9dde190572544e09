"""splitserve.rpc"""
