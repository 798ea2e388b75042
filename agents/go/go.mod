module github.com/quiesce-dev/quiesce/agents/go

go 1.19
