"""turboflow.storage"""
