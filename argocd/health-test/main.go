// Command health-test runs the Argo CD health checks under resource_customizations/ against their test cases, the
// way Argo CD's own harness (util/lua health tests) does:
//
//   - every directory holding a health.lua also holds a health_test.yaml:
//     `tests: [{healthStatus: {status, message}, inputPath: testdata/x.yaml}]`;
//   - each input is read with sigs.k8s.io/yaml (YAML → JSON → map[string]any, so numbers are float64, `null` is
//     nil, empty arrays and objects are empty tables) and handed to the script as the global `obj`;
//   - the script runs in a fresh gopher-lua state with a one-second deadline, and its return value is turned into
//     JSON and read as `{status, message}`; a status outside Healthy, Progressing, Degraded, Suspended, Missing and
//     Unknown becomes Unknown with "Lua returned an invalid health status";
//   - status and message must equal the expected ones exactly.
//
// Each case runs twice: with every standard library open (what Argo CD's harness and its built-in checks get), and
// with only the base, table and package libraries (what a script installed through argocd-cm gets unless
// `resource.customizations.useOpenLibs.<group>_<kind>` is set). Both must give the expected result, so a script
// that passes here also works when an admin pastes it into argocd-cm.
//
// The input's apiVersion group and kind must name the directory the script sits in (`<group>/<Kind>`), since
// Argo CD picks the script by the object's group and kind.
//
// A Lua error, a timeout, a wrong return type or a panic in the interpreter is a failed case, never a crash. The
// runner also checks itself on a few broken scripts (`self-check` cases) before it runs the real ones.
//
// Output: one `ok - <case>` or `FAIL - <case>: <why>` line per case, then `argocd-health: N passed, M failed` as the
// last line. The exit code is 1 when a case failed, 2 when the cases could not be read.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

// HealthStatus is what a health script returns, as Argo CD reads it.
type HealthStatus struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

// testFile is the layout of a health_test.yaml.
type testFile struct {
	Tests []struct {
		HealthStatus HealthStatus `json:"healthStatus"`
		InputPath    string       `json:"inputPath"`
	} `json:"tests"`
}

// testCase is one input with its expected result and the script it is checked with.
type testCase struct {
	name      string
	dir       string
	script    string
	inputPath string
	expected  HealthStatus
}

// libraries says which standard Lua libraries a run opens.
type libraries int

const (
	// allLibraries opens every standard library, as Argo CD's test harness and its built-in checks do.
	allLibraries libraries = iota
	// argocdCmLibraries opens only base, table and package, as Argo CD does for a script from argocd-cm.
	argocdCmLibraries
)

func (l libraries) String() string {
	if l == allLibraries {
		return "all libraries"
	}
	return "argocd-cm libraries (base, table, package)"
}

// scriptTimeout is Argo CD's deadline for one health script.
const scriptTimeout = time.Second

var validStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

const invalidHealthStatus = "Lua returned an invalid health status"

func main() {
	root := flag.String("dir", "resource_customizations", "the resource_customizations directory to test")
	skipSelfCheck := flag.Bool("skip-self-check", false, "do not check the runner on its built-in broken scripts")
	flag.Parse()

	passed, failed := 0, 0
	report := func(name string, err error) {
		if err != nil {
			failed++
			fmt.Printf("FAIL - %s: %s\n", name, oneLine(err.Error()))
			return
		}
		passed++
		fmt.Printf("ok - %s\n", name)
	}

	if !*skipSelfCheck {
		for _, check := range selfChecks() {
			report("self-check: "+check.name, check.run())
		}
	}

	cases, err := collect(*root)
	if err != nil {
		fmt.Printf("FAIL - reading the test cases under %s: %s\n", *root, oneLine(err.Error()))
		fmt.Printf("argocd-health: %d passed, %d failed\n", passed, failed+1)
		os.Exit(2)
	}
	for _, tc := range cases {
		report(tc.name, tc.check())
	}
	fmt.Printf("argocd-health: %d passed, %d failed\n", passed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}

// collect walks root for health.lua files and reads the test cases of each one's health_test.yaml, sorted by name.
func collect(root string) ([]testCase, error) {
	info, err := os.Stat(root)
	if err != nil {
		return nil, err
	}
	if !info.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", root)
	}
	var cases []testCase
	scripts := 0
	err = filepath.WalkDir(root, func(path string, entry fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if entry.IsDir() || entry.Name() != "health.lua" {
			return nil
		}
		scripts++
		dir := filepath.Dir(path)
		script, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		testPath := filepath.Join(dir, "health_test.yaml")
		raw, err := os.ReadFile(testPath)
		if err != nil {
			return fmt.Errorf("%s has no test file: %w", path, err)
		}
		var tests testFile
		if err := yaml.UnmarshalStrict(raw, &tests); err != nil {
			return fmt.Errorf("parsing %s: %w", testPath, err)
		}
		if len(tests.Tests) == 0 {
			return fmt.Errorf("%s lists no tests", testPath)
		}
		prefix, err := filepath.Rel(root, dir)
		if err != nil {
			return err
		}
		for i, test := range tests.Tests {
			if test.InputPath == "" {
				return fmt.Errorf("%s: test %d has no inputPath", testPath, i+1)
			}
			cases = append(cases, testCase{
				name:      filepath.ToSlash(filepath.Join(prefix, test.InputPath)),
				dir:       filepath.ToSlash(prefix),
				script:    string(script),
				inputPath: filepath.Join(dir, test.InputPath),
				expected:  test.HealthStatus,
			})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if scripts == 0 {
		return nil, errors.New("no health.lua found")
	}
	sort.Slice(cases, func(i, j int) bool { return cases[i].name < cases[j].name })
	return cases, nil
}

// check runs the case under both library sets and compares each result with the expected one.
func (tc testCase) check() error {
	raw, err := os.ReadFile(tc.inputPath)
	if err != nil {
		return err
	}
	obj, err := parseObject(raw)
	if err != nil {
		return fmt.Errorf("parsing %s: %w", tc.inputPath, err)
	}
	if key := configMapKey(obj); key != tc.dir {
		return fmt.Errorf("the input is a %s, but the script is for %s (Argo CD picks it by group and kind)", key, tc.dir)
	}
	for _, libs := range []libraries{allLibraries, argocdCmLibraries} {
		got, err := executeHealth(obj, tc.script, libs)
		if err != nil {
			return fmt.Errorf("with %s: %w", libs, err)
		}
		if *got != tc.expected {
			return fmt.Errorf("with %s: got {status: %q, message: %q}, want {status: %q, message: %q}",
				libs, got.Status, got.Message, tc.expected.Status, tc.expected.Message)
		}
	}
	return nil
}

// parseObject reads a manifest the way Argo CD's harness does: sigs.k8s.io/yaml into a map[string]any.
func parseObject(raw []byte) (map[string]any, error) {
	obj := map[string]any{}
	if err := yaml.Unmarshal(raw, &obj); err != nil {
		return nil, err
	}
	if len(obj) == 0 {
		return nil, errors.New("the file holds no object")
	}
	return obj, nil
}

// configMapKey is Argo CD's key for an object's health script: `<group>/<Kind>`, or `<Kind>` for the core group.
func configMapKey(obj map[string]any) string {
	apiVersion, _ := obj["apiVersion"].(string)
	kind, _ := obj["kind"].(string)
	group := ""
	if slash := strings.LastIndex(apiVersion, "/"); slash >= 0 {
		group = apiVersion[:slash]
	}
	if group == "" {
		return kind
	}
	return group + "/" + kind
}

// executeHealth runs script with obj as the global `obj` and reads its result as Argo CD does. Any error of the
// interpreter, including a panic inside it, comes back as an error.
func executeHealth(obj map[string]any, script string, libs libraries) (status *HealthStatus, err error) {
	defer func() {
		if recovered := recover(); recovered != nil {
			status, err = nil, fmt.Errorf("the Lua interpreter panicked: %v", recovered)
		}
	}()
	state := lua.NewState(lua.Options{SkipOpenLibs: libs != allLibraries})
	defer state.Close()
	for _, library := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := state.CallByParam(lua.P{Fn: state.NewFunction(library.open), NRet: 0, Protect: true},
			lua.LString(library.name)); err != nil {
			return nil, fmt.Errorf("opening the Lua %s library: %w", library.name, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	state.SetContext(ctx)
	state.SetGlobal("obj", toLua(state, obj))
	chunk, err := state.Load(strings.NewReader(script), "health.lua")
	if err != nil {
		return nil, fmt.Errorf("health.lua failed: %s", luaErrorText(err))
	}
	state.Push(chunk)
	if err := state.PCall(0, lua.MultRet, nil); err != nil {
		return nil, fmt.Errorf("health.lua failed: %s", luaErrorText(err))
	}
	returned := state.Get(-1)
	if returned.Type() != lua.LTTable {
		return nil, fmt.Errorf("expect table output from Lua script, not %s", returned.Type())
	}
	encoded, err := toJSON(returned, map[*lua.LTable]bool{})
	if err != nil {
		return nil, fmt.Errorf("encoding the returned table: %w", err)
	}
	bytes, err := json.Marshal(encoded)
	if err != nil {
		return nil, fmt.Errorf("encoding the returned table: %w", err)
	}
	result := &HealthStatus{}
	if err := json.Unmarshal(bytes, result); err != nil {
		return nil, fmt.Errorf("reading %s as a health status: %w", bytes, err)
	}
	if !validStatuses[result.Status] {
		return &HealthStatus{Status: "Unknown", Message: invalidHealthStatus}, nil
	}
	return result, nil
}

// luaErrorText is the interpreter's message without its stack trace.
func luaErrorText(err error) string {
	var apiError *lua.ApiError
	if errors.As(err, &apiError) && apiError.Object != nil {
		text := apiError.Object.String()
		if apiError.Cause != nil && !strings.Contains(text, apiError.Cause.Error()) {
			text += ": " + apiError.Cause.Error()
		}
		return text
	}
	return err.Error()
}

// toLua turns a JSON-like Go value into a Lua value: maps and slices become tables (an empty one either way),
// numbers become numbers, nil and anything else become nil.
func toLua(state *lua.LState, value any) lua.LValue {
	switch converted := value.(type) {
	case bool:
		return lua.LBool(converted)
	case float64:
		return lua.LNumber(converted)
	case int64:
		return lua.LNumber(converted)
	case int:
		return lua.LNumber(converted)
	case string:
		return lua.LString(converted)
	case json.Number:
		return lua.LString(converted)
	case []any:
		table := state.CreateTable(len(converted), 0)
		for _, item := range converted {
			table.Append(toLua(state, item))
		}
		return table
	case map[string]any:
		table := state.CreateTable(0, len(converted))
		for key, item := range converted {
			table.RawSetH(lua.LString(key), toLua(state, item))
		}
		return table
	}
	return lua.LNil
}

// toJSON turns a Lua value into a value encoding/json can write, as Argo CD's Lua-to-JSON step does: a table whose
// keys are 1..n in order is an array, any other table an object with its keys as strings, an empty table null;
// functions, userdata, threads and channels cannot be encoded, nor a table that contains itself.
func toJSON(value lua.LValue, visiting map[*lua.LTable]bool) (any, error) {
	switch converted := value.(type) {
	case lua.LBool:
		return bool(converted), nil
	case lua.LNumber:
		return float64(converted), nil
	case lua.LString:
		return string(converted), nil
	case *lua.LNilType:
		return nil, nil
	case *lua.LTable:
		if visiting[converted] {
			return nil, errors.New("cannot encode recursively nested tables to JSON")
		}
		visiting[converted] = true
		defer delete(visiting, converted)
		var array []any
		var object map[string]any
		var failure error
		converted.ForEach(func(key, item lua.LValue) {
			if failure != nil {
				return
			}
			encoded, err := toJSON(item, visiting)
			if err != nil {
				failure = err
				return
			}
			if index, isNumber := key.(lua.LNumber); isNumber && object == nil && int(index)-1 == len(array) {
				array = append(array, encoded)
				return
			}
			if object == nil {
				object = make(map[string]any, len(array)+1)
				for i, previous := range array {
					object[strconv.Itoa(i+1)] = previous
				}
			}
			object[key.String()] = encoded
		})
		if failure != nil {
			return nil, failure
		}
		if object != nil {
			return object, nil
		}
		if array == nil {
			return nil, nil
		}
		return array, nil
	default:
		return nil, fmt.Errorf("cannot encode %s to JSON", value.Type())
	}
}

// oneLine keeps a failure on its `FAIL - ` line.
func oneLine(text string) string {
	return strings.Join(strings.Fields(text), " ")
}

// selfCheck is a broken script and what the runner must make of it.
type selfCheck struct {
	name string
	run  func() error
}

// selfChecks prove that a broken script fails its case instead of crashing the runner or passing.
func selfChecks() []selfCheck {
	obj := map[string]any{
		"apiVersion": "parley.dev/v1alpha1",
		"kind":       "Region",
		"metadata":   map[string]any{"name": "eu", "generation": float64(2), "annotations": map[string]any{}},
		"status":     map[string]any{"conditions": []any{}},
	}
	wantError := func(script, contains string, only ...libraries) func() error {
		if len(only) == 0 {
			only = []libraries{allLibraries, argocdCmLibraries}
		}
		return func() error {
			for _, libs := range only {
				got, err := executeHealth(obj, script, libs)
				if err == nil {
					return fmt.Errorf("with %s: the broken script gave %+v instead of an error", libs, *got)
				}
				if !strings.Contains(err.Error(), contains) {
					return fmt.Errorf("with %s: the error %q does not say %q", libs, err, contains)
				}
			}
			return nil
		}
	}
	want := func(script string, expected HealthStatus, libs libraries) func() error {
		return func() error {
			got, err := executeHealth(obj, script, libs)
			if err != nil {
				return fmt.Errorf("with %s: %w", libs, err)
			}
			if *got != expected {
				return fmt.Errorf("with %s: got %+v, want %+v", libs, *got, expected)
			}
			return nil
		}
	}
	return []selfCheck{
		{"a Lua error in health.lua is a failure", wantError(`return obj.status.rollout.paused`, "attempt to index")},
		{"a syntax error in health.lua is a failure", wantError(`return {status = "Healthy"`, "health.lua failed")},
		{"a script that returns no table is a failure", wantError(`local x = 1`, "expect table output")},
		{"a script that never ends is stopped after 1 s",
			wantError(`while true do end`, "context deadline exceeded", argocdCmLibraries)},
		{"a returned function is a failure", wantError(`return {status = "Healthy", message = print}`, "cannot encode")},
		{"a non-string message is a failure", wantError(`return {status = "Healthy", message = 3}`, "as a health status")},
		{"an invalid status reads as Unknown", want(`return {status = "Fine"}`,
			HealthStatus{Status: "Unknown", Message: invalidHealthStatus}, allLibraries)},
		{"an empty table reads as Unknown", want(`return {}`,
			HealthStatus{Status: "Unknown", Message: invalidHealthStatus}, allLibraries)},
		{"the string library is missing with argocd-cm libraries",
			wantError(`return {status = string.upper("healthy")}`, "attempt to index", argocdCmLibraries)},
		{"empty objects and arrays are empty tables", want(
			`if next(obj.metadata.annotations) == nil and #obj.status.conditions == 0 then
				return {status = "Healthy", message = "generation " .. obj.metadata.generation} end
			return {status = "Degraded"}`,
			HealthStatus{Status: "Healthy", Message: "generation 2"}, argocdCmLibraries)},
	}
}
