"""The same stateless functions on other platforms: an HTTP function (Knative, OpenFaaS of-watchdog), an
AWS Lambda handler; and a Flower app directory hosted as a fedge client app."""
