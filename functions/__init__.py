"""turboflow.functions"""
