package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runMainEnv makes the test binary run the example's main instead of the tests.
const runMainEnv = "QUIESCE_EXAMPLE_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Args = append([]string{os.Args[0]}, strings.Fields(os.Getenv(runMainEnv+"_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// example is the example service running in a child process.
type example struct {
	cmd    *exec.Cmd
	addr   string
	stderr *strings.Builder
	exited chan error
}

// start runs the example with QUIESCE_CONTROL_SOCKET set to socket ("" for none), waits until
// it listens, and kills it when the test ends.
func start(t *testing.T, socket string) *example {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), runMainEnv+"=1", runMainEnv+"_ARGS=-addr 127.0.0.1:0 -tick 50ms",
		"QUIESCE_CONTROL_SOCKET="+socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	e := &example{cmd: cmd, stderr: &strings.Builder{}, exited: make(chan error, 1)}
	cmd.Stderr = e.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		lines <- line
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case line := <-lines:
		e.addr = strings.TrimSpace(strings.TrimPrefix(line, "listening on http://"))
	case <-time.After(10 * time.Second):
		t.Fatal("the example did not start")
	}
	go func() { e.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-e.exited
	})
	return e
}

func (e *example) wait(t *testing.T) {
	t.Helper()
	select {
	case err := <-e.exited:
		e.exited <- err
		if err != nil {
			t.Fatalf("the example exited with %v; its log:\n%s", err, e.stderr)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the example did not exit")
	}
}

func get(t *testing.T, url string) <-chan error {
	done := make(chan error, 1)
	go func() {
		client := http.Client{Timeout: 5 * time.Second}
		resp, err := client.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = errors.New(resp.Status)
			}
		}
		done <- err
	}()
	return done
}

func TestSIGTERMWithoutASupervisorRunsTheSteps(t *testing.T) {
	e := start(t, "")
	if err := <-get(t, "http://"+e.addr+"/work"); err != nil {
		t.Fatal(err)
	}
	if err := e.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	e.wait(t)
	log := e.stderr.String()
	for _, want := range []string{"step drain finished: ok", "step stop-cron finished: ok", "step stop-consumer finished: ok", "step close finished: ok", "stopped"} {
		if !strings.Contains(log, want) {
			t.Errorf("no %q in the log:\n%s", want, log)
		}
	}
}

func TestDrivenOverTheControlSocket(t *testing.T) {
	dir := t.TempDir()
	socket := filepath.Join(dir, "control.sock")
	e := start(t, socket)
	var c net.Conn
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if c, err = net.DialTimeout("unix", socket, 5*time.Second); err == nil {
			break
		}
		if time.Now().After(end) {
			t.Fatal(err)
		}
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	ask := func(line string) map[string]any {
		t.Helper()
		if _, err := c.Write([]byte(line + "\n")); err != nil {
			t.Fatal(err)
		}
		reply, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(reply), &m); err != nil || m["ok"] != true {
			t.Fatalf("%s: %s", line, reply)
		}
		return m
	}
	if m := ask("health"); m["healthy"] != true {
		t.Fatalf("health: %v", m)
	}
	ask("hello role=driver")
	slow := get(t, "http://"+e.addr+"/work?ms=300")
	time.Sleep(100 * time.Millisecond) // the request is in flight
	drain := ask("drain deadline_ms=5000 budgets_ms=1000,4000")
	if err := <-slow; err != nil {
		t.Fatalf("the request in flight was not drained: %v", err)
	}
	if drain["outcome"] != "ok" || drain["counts"].(map[string]any)["requests_drained"] != 1.0 {
		t.Fatalf("drain: %v", drain)
	}
	for _, verb := range []string{"stop-cron", "stop-consumer", "stop-poller", "close"} {
		if m := ask(verb + " deadline_ms=3000"); m["outcome"] != "ok" {
			t.Fatalf("%s: %v", verb, m)
		}
	}
	e.wait(t)
	if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the socket file is still there: %v", err)
	}
}
