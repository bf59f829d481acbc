"""The same stateless functions on other platforms: an HTTP function (Knative, OpenFaaS of-watchdog), an
AWS Lambda handler, and a Flower ``NumPyClient`` wrapped as a fedge ``train`` function."""
